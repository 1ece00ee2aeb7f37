"""When a parity row passes: default bounds, an artifact's own, and the noise-floor rule.

With int8 dynamic activations the reference moves this far from itself under float-rounding
perturbation (its noise floor, ``harness.noise_floor``); such an artifact passes if it is no
further than that, with slack. Everything else is held to the default bounds (or the ones its
manifest sets under ``parity_bounds``).
"""

from __future__ import annotations

from typing import Any

DEFAULT_BOUNDS = {"top1": 0.99, "mean_kl": 1e-3, "ppl_ratio": 0.02}  # teacher-forced, trained weights
FLOOR_TOP1_MARGIN, FLOOR_KL_FACTOR = 0.05, 2.0


def bounds_for(row, manifest: dict[str, Any] | None) -> dict[str, float]:
    bounds = dict(DEFAULT_BOUNDS)
    if manifest and manifest.get("parity_bounds"):
        bounds.update(manifest["parity_bounds"])
    if row.floor_top1 is not None:  # activation-quantized: judged against the reference's own floor
        # The floor is one perturbed sample of a few dozen steps: a 100 % floor does not make one
        # flipped near-tie in 24 steps (95.8 %) a failure, so the margin applies whatever it is.
        bounds["top1"] = min(bounds["top1"], row.floor_top1 - FLOOR_TOP1_MARGIN)
        bounds["mean_kl"] = max(bounds["mean_kl"], FLOOR_KL_FACTOR * row.floor_kl)
    return bounds


def problems(row, manifest: dict[str, Any] | None = None) -> list[str]:
    """What keeps ``row`` (a ``ParityRow``) from passing; empty when it passes."""
    b = bounds_for(row, manifest)
    out = []
    if row.top1 < b["top1"]:
        out.append(f"top-1 {100 * row.top1:.1f}% < {100 * b['top1']:.1f}%")
    if row.mean_kl > b["mean_kl"]:
        out.append(f"mean KL {row.mean_kl:.2e} > {b['mean_kl']:.1e}")
    if row.ppl_ratio is not None and abs(row.ppl_ratio - 1) > b["ppl_ratio"]:
        out.append(f"perplexity ratio {row.ppl_ratio:.4f} outside ±{100 * b['ppl_ratio']:.0f}%")
    return out
