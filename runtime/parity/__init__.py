"""The one parity harness (``harness``) and its pass/fail judgement (``bounds``)."""

from runtime.parity.bounds import DEFAULT_BOUNDS, bounds_for, problems
from runtime.parity.harness import (DEFAULT_PROMPTS, ParityReport, ParityRow, StepStats, all_logits, compare_logits,
                                    greedy_agreement, greedy_prefix, greedy_run, greedy_tokens, merge_reports,
                                    noise_floor, perplexity, run_parity, teacher_forced)

__all__ = ["DEFAULT_BOUNDS", "bounds_for", "problems", "DEFAULT_PROMPTS", "ParityReport", "ParityRow", "StepStats",
           "all_logits", "compare_logits", "greedy_agreement", "greedy_prefix", "greedy_run", "greedy_tokens",
           "merge_reports", "noise_floor", "perplexity", "run_parity", "teacher_forced"]
