"""Tests of the privacy accounting math and the site privacy ledger."""
