"""Regenerate tests/fixtures/ref_map_{input,attention}_{A,B}.pt from the MAP reference code.

    python tools/parity/make_map.py --refs REFS_DIR

REFS_DIR holds the checkout ``missing_aware_prompts`` at the pinned commit (tools/parity/common.py); the command
prints the ``git clone`` / ``git checkout`` lines when it is missing or elsewhere. The reference files are imported,
never edited. Configurations and layout: tests/fixtures/README.md.
"""
from __future__ import annotations

import sys

import torch

from common import generator_main
from vilt_fixture import load_vilt_reference, make_fixture

MAP_KEYS = ("prompt_type", "prompt_length", "prompt_layers", "learnt_p", "multi_layer_prompt")
# (prompt_type, configuration) -> method keys; attention mode needs 12 heads (the reference hard-codes them).
VARIANTS = {
    ("input", "A"): dict(prompt_type="input", prompt_length=4, prompt_layers=[0, 1]),
    ("input", "B"): dict(prompt_type="input", prompt_length=6, prompt_layers=[0, 1, 2]),
    ("attention", "A"): dict(prompt_type="attention", prompt_length=4, prompt_layers=[0, 1], hidden_size=48,
                             num_heads=12),
    ("attention", "B"): dict(prompt_type="attention", prompt_length=6, prompt_layers=[0, 1, 2], hidden_size=36,
                             num_heads=12),
}
PROMPTS = ("complete_prompt", "missing_text_prompt", "missing_img_prompt")




def initial_prompts(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The reference's deterministic prompt init (before the fixture's noise)."""
    return {name: getattr(model, name).detach().clone() for name in PROMPTS}


def main(argv: list[str] | None = None) -> int:
    variants = {f"{prompt_type}_{config}": (config, updates) for (prompt_type, config), updates in VARIANTS.items()}
    return generator_main(__doc__.splitlines()[0], "map", variants,
                          lambda refs: load_vilt_reference(refs, "map", "vilt", "ViLTransformerSS", MAP_KEYS),
                          lambda ref, name: make_fixture(ref, *variants[name], init_prompts=initial_prompts), argv)


if __name__ == "__main__":
    sys.exit(main())
