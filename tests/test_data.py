import numpy as np
import pytest

from shared.data import DataError, load_digits, load_mnist1d, load_site_file, site_file_split


def test_mnist1d_has_the_paper_split():
    data = load_mnist1d()
    assert data.train.x.shape == (4000, 40) and data.test.x.shape == (1000, 40)
    assert data.train.x.dtype == np.float32 and data.train.y.dtype == np.int64
    assert set(np.unique(data.train.y)) == set(range(10))
    assert data.spec.shape == (40,) and data.spec.num_classes == 10


def test_mnist1d_is_the_same_every_time():
    a, b = load_mnist1d(300), load_mnist1d.__wrapped__(300)
    assert np.array_equal(a.train.x, b.train.x) and np.array_equal(a.test.y, b.test.y)


def test_digits_are_bundled():
    data = load_digits()
    assert data.train.x.shape[1:] == (1, 8, 8)
    assert len(data.train) + len(data.test) == 1797
    assert data.train.x.min() >= 0.0 and data.train.x.max() <= 1.0


def test_npz_site_file(tmp_path):
    path = tmp_path / "site.npz"
    np.savez(path, x=np.ones((6, 4)), y=np.array([0, 1, 2, 0, 1, 2]))
    data = load_site_file(path)
    assert data.x.shape == (6, 4) and data.y.tolist() == [0, 1, 2, 0, 1, 2]


def test_csv_site_file_with_a_label_column(tmp_path):
    path = tmp_path / "site.csv"
    path.write_text("a,b,diagnosis\n0.5,1,1\n2,3.5,0\n")
    data = load_site_file(path, label_column="diagnosis")
    assert data.x.tolist() == [[0.5, 1.0], [2.0, 3.5]] and data.y.tolist() == [1, 0]
    split = site_file_split(path, "diagnosis", test_fraction=0.5)
    assert split.spec.shape == (2,) and split.spec.num_classes == 2


def test_site_files_without_labels_are_refused(tmp_path):
    npz = tmp_path / "nolabels.npz"
    np.savez(npz, x=np.ones((3, 2)))
    with pytest.raises(DataError, match="has no y array"):
        load_site_file(npz)
    csv = tmp_path / "nolabels.csv"
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="no label column 'label'"):
        load_site_file(csv)


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("x.parquet", "", "unknown data file format '.parquet'"),
        ("bad.csv", "a,label\n1,cat\n", "non-numeric value"),
        ("frac.csv", "a,label\n1,0.5\n", "must hold integers"),
        ("short.csv", "a,b,label\n1,2\n", "2 values, header has 3"),
        ("empty.csv", "a,label\n", "has no rows"),
    ],
)
def test_bad_site_files_name_the_file(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_site_file(path)


def test_missing_site_file(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_site_file(tmp_path / "absent.npz")
