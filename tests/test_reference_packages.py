"""reference_packages.require: a missing reference package skips its test module, except under CI, where it fails."""

import pytest
from reference_packages import require


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception),
                                         ("false", pytest.skip.Exception)])  # fmt: skip
def test_missing_package_fails_under_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match=r"test_reference_packages needs 'nf4lora_no_such_package'.*pip install -e"):
        require("nf4lora_no_such_package")


def test_installed_package_is_returned(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert require("torch").__name__ == "torch"
