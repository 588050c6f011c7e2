"""vlmalign/compat.py: each private transformers / accelerate member vlmalign relies on is checked, and a missing or
changed one stops `import vlmalign.trainers` with an error naming it and the supported range."""

from __future__ import annotations

import importlib
import re

import pytest

from vlmalign import compat
from vlmalign.compat import MEMBERS, TransformersCompatError


def test_the_installed_versions_pass():
    compat.check()
    assert len(MEMBERS) == len({m.qualname for m in MEMBERS}) >= 20


def _remove(monkeypatch, member):
    """Make `member` disappear the way a release could: deleted from its class, or no longer assigned."""
    if member.kind == "assigned":
        real = compat._module_source
        pattern = rf"\.{re.escape(member.name)}\s*=(?!=)"
        monkeypatch.setattr(compat, "_module_source",
                            lambda name: re.sub(pattern, ".renamed_by_the_test =", real(name)) if name == member.owner
                            else real(name))
    elif member.kind == "source":
        owner = compat._owner(member)
        monkeypatch.setattr(owner, member.name, classmethod(lambda cls, *args, **kwargs: None))
    else:
        monkeypatch.delattr(compat._owner(member), member.name)


@pytest.mark.parametrize("member", MEMBERS, ids=lambda m: m.qualname)
def test_a_missing_member_is_named(monkeypatch, member):
    _remove(monkeypatch, member)
    assert compat.problem(member) is not None
    with pytest.raises(TransformersCompatError) as info:
        compat.check()
    message = str(info.value)
    assert member.qualname in message
    assert compat.SUPPORTED_TRANSFORMERS in message
    # only that member is reported
    assert sum(m.qualname + " (" in message for m in MEMBERS) == 1


def test_changed_parameters_are_named(monkeypatch):
    from transformers import Trainer

    def _get_train_sampler(self, train_dataset, seed):  # a release that adds a parameter our override does not take
        return None

    monkeypatch.setattr(Trainer, "_get_train_sampler", _get_train_sampler)
    with pytest.raises(TransformersCompatError, match=r"Trainer\._get_train_sampler .*parameters are "
                                                      r"\(train_dataset, seed\), expected \(train_dataset\)"):
        compat.check()


def test_importing_the_trainers_runs_the_check(monkeypatch):
    import vlmalign.trainers
    from transformers import Trainer

    monkeypatch.delattr(Trainer, "_get_train_sampler")
    with pytest.raises(TransformersCompatError, match=r"transformers\.trainer\.Trainer\._get_train_sampler"):
        importlib.reload(vlmalign.trainers)
    monkeypatch.undo()
    importlib.reload(vlmalign.trainers)


def test_pyproject_states_the_same_range():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert f'"transformers{compat.SUPPORTED_TRANSFORMERS}"' in text
