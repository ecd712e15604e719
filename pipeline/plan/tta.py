"""``predict.tta: auto`` with a budget: the largest cut of the augmentation's TTA whose inference fits
what the rest of the run leaves of the budget."""

from __future__ import annotations

from pipeline.config.schema import Config
from pipeline.plan.facts import Facts
from pipeline.plan.speed import Speed

INFER_SHARE = 0.25  # of the budget at most, for evaluate's TTA OOF and predict's TTA ...
WHOLE = 1.4  # ... and no more than leaves the whole run (start, plan, training, evaluate, predict) within
WHOLE_FILL = 0.95  # this share of WHOLE budgets, at the expected training time
START_S = 5.0  # an interpreter's start, its imports and the data's facts before the plan (here: 4.6 s + 1.7 s)
EVAL_S = 6.0  # evaluate besides its TTA OOF (adversarial validation, report, Grad-CAM: SAR, 106 rows, 5.8 s),
# plus one pass over train and test at the validation speed (_evaluate_s)
_TTA_LADDER = (
    ["identity", "hflip", "vflip", "rot180"],
    ["identity", "rot180"],
    ["identity", "hflip"],
    ["identity", "vflip"],
    ["identity"],
)  # groups, largest first: an average over one stays invariant


def _evaluate_s(facts: Facts, speed: Speed) -> float:
    """Evaluate's seconds besides the TTA OOF: ``EVAL_S`` and one pass over every train and test image."""
    return EVAL_S + (facts.n_rows + facts.n_test) / speed.val_img_s


def _fit_tta(
    cfg: Config, facts: Facts, size: int, speed: Speed, n_models: int, budget: float, why: list, *, left_s: float
) -> list[str]:
    """``predict.tta: auto`` with a budget: the augment rule's TTA (pipeline/config/auto.py), or the largest
    cut of it whose inference (every model on the test set, and the OOF through the same TTA) fits
    ``INFER_SHARE`` of the budget at the measured validation speed, and ``left_s``: what the start, the
    plan, the expected training and evaluate leave of ``WHOLE_FILL`` x ``WHOLE`` budgets. The flips
    and quarter turns come first (exact symmetries, when the augmentation has them): the largest group
    within them, with the affine views, then without, then the next group down."""
    from pipeline.config.auto import affine_tta, auto_tta, d4_tta
    from pipeline.models.tta import build_tta

    def n(names):
        return len(build_tta(names, (size, size)))

    def seconds(names):
        rows = n_models * facts.n_test + (facts.n_rows if cfg.predict.tta_oof else 0)
        return n(names) * rows / speed.val_img_s + 2 * n_models * speed.build_s

    full, d4, affine = auto_tta(cfg.augment), d4_tta(cfg.augment), affine_tta(cfg.augment)
    allowed = {t.key for t in build_tta(d4, (size, size))}
    groups = [d4] + [g for g in _TTA_LADDER if n(g) < n(d4) and {t.key for t in build_tta(g, (size, size))} <= allowed]
    ladder = [c for g in groups for c in ([g + affine, g] if affine else [g])]
    allowed_s = min(INFER_SHARE * budget, left_s)
    limit = (
        f"{INFER_SHARE:.0%} of the budget"
        if allowed_s == INFER_SHARE * budget
        else f"the ~{max(left_s, 0):.0f} s the rest of the run leaves of {WHOLE_FILL * WHOLE:.2f}x the budget"
    )
    chosen = next((g for g in ladder if seconds(g) <= allowed_s), ["identity"])
    if seconds(chosen) > left_s:
        whole = WHOLE_FILL * WHOLE * budget - left_s + seconds(chosen)
        why.append(
            f"the whole run is expected to take ~{whole:.0f} s ({whole / budget:.2f}x the {budget:.0f} s budget) even "
            f"without TTA: starting, planning and evaluating take about as long whatever the budget"
        )
    if chosen != full:
        why.append(
            f"TTA {chosen} instead of the augmentation's {full}: "
            f"{n(full)} transforms would take ~{seconds(full):.0f} s "
            f"of inference on {facts.n_test} test and {facts.n_rows} OOF images, over {limit}"
        )
    else:
        why.append(f"TTA {full}: ~{seconds(full):.0f} s of inference, within {limit}")
    return chosen
