"""Golden fixtures of the parity tests (tests/fixtures/README.md): a missing file fails the test, never skips it."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


@lru_cache(maxsize=None)
def golden(name: str, how: str) -> dict:
    """The fixture file ``name`` (loaded once); a missing one fails the test naming ``how`` it is made."""
    path = FIXTURES / name
    if not path.is_file():
        pytest.fail(f"golden fixture {name} is missing: {how} (tests/fixtures/README.md)")
    return torch.load(path, map_location="cpu", weights_only=True)


# the seeds' tolerances (fp32, CPU): logits absolute, loss relative, gradients absolute + relative
LOGITS_ATOL = 1e-5
LOSS_RTOL = 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-4


def checked_state(record: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (the reference weights regenerated from the hash init) after checking it against the fixture
    ``record``'s float64 checksums (equal up to the summation order of the thread count)."""
    from dcp_hashinit import checksum

    sums = torch.stack([checksum(state[k]) for k in record["keys"]])
    assert torch.allclose(sums, record["checksums"], rtol=1e-12, atol=0), "regenerated weights differ from the fixture's"
    return state


def fixture_loader(pattern: str, how: str) -> Callable[[str], dict]:
    """``config -> golden(pattern.format(config), how)``."""
    return lambda config: golden(pattern.format(config), how)


def state_loader(fixture: Callable[[str], dict], make: Callable[[dict], dict]) -> Callable[[str, str], dict]:
    """``(config, head) -> `` the reference weights ``make(record)`` of the fixture's record, checked (``checked_state``)
    and cached."""
    @lru_cache(maxsize=None)
    def reference_state(config: str, head: str) -> dict[str, torch.Tensor]:
        record = fixture(config)[head]
        return checked_state(record, make(record))
    return reference_state


def assert_grad_matches(grad: torch.Tensor | None, ref: dict, name: str) -> None:
    """A gradient against the fixture's: the whole tensor (``full``), or sampled entries (``idx`` / ``val``) and the
    float64 norm."""
    assert grad is not None, name
    if "full" in ref:
        torch.testing.assert_close(grad, ref["full"], atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=name)
        return
    torch.testing.assert_close(grad.reshape(-1)[ref["idx"]], ref["val"], atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=name)
    torch.testing.assert_close(grad.double().norm(), ref["norm"], atol=0, rtol=GRAD_RTOL, msg=name)
