"""slimgpt asks OpenMP for sleeping waits before torch loads, unless the user chose a policy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "import os, slimgpt, torch; print(os.environ.get('OMP_WAIT_POLICY'))"


def _policy_after_import(env: dict[str, str], code: str = PROBE) -> str:
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return {**env, **extra}


def test_importing_slimgpt_first_sets_a_passive_wait_policy() -> None:
    assert _policy_after_import(_env()) == "PASSIVE"


@pytest.mark.parametrize("chosen", ["ACTIVE", "passive"])
def test_a_policy_the_user_set_is_kept(chosen: str) -> None:
    assert _policy_after_import(_env(OMP_WAIT_POLICY=chosen)) == chosen


def test_nothing_is_set_when_torch_was_loaded_first() -> None:
    # OpenMP has read its settings by then: setting the variable would claim an effect it cannot have.
    code = "import os, torch, slimgpt; print(os.environ.get('OMP_WAIT_POLICY'))"
    assert _policy_after_import(_env(), code) == "None"
