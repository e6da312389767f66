"""Captioning and VQA evaluators (CIDEr-D / BLEU-4 and VQAv2 accuracy) over the pipeline."""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from muddit_jax.eval.base import Evaluator, Example, register, stack_images
from muddit_jax.eval.cider import bleu4, cider_d
from muddit_jax.eval.compositional import caption_names_objects
from muddit_jax.eval.text_norm import normalize_caption
from muddit_jax.eval.vqa_accuracy import vqa_score


@register("caption")
class CaptionEvaluator(Evaluator):
    """Examples: ``{"id", "image" [H, W, 3] uint8, "captions": [str, ...]}`` and, for ``shapes``,
    ``"objects"`` (then ``attribute_accuracy``: the fraction of captions that name every object's
    colour + shape and nothing else, see :func:`caption_names_objects`)."""

    config_options = (*Evaluator.config_options, "text_sampling", "caption_max_tokens")

    def predict(self, pipe: Any, batch: Sequence[Example], seeds: Sequence[int]) -> list[str]:
        return pipe.caption(stack_images(batch), steps=self.steps, seed=list(seeds),
                            sampling=self.options.get("text_sampling", "multinomial"),
                            max_tokens=self.options.get("caption_max_tokens") or None)

    def score(self, predictions: Mapping[str, Any], examples: Sequence[Example]) -> dict[str, float]:
        ids = [str(e["id"]) for e in examples]
        cands = {i: normalize_caption(predictions[i]) for i in ids}
        refs = {str(e["id"]): [normalize_caption(c) for c in e["captions"]] for e in examples}
        out = {"cider_d": cider_d(cands, refs)[0], "bleu4": bleu4(cands, refs)[0]}
        if all("objects" in e for e in examples):  # shapes: every object's colour + shape named
            named = [caption_names_objects(predictions[i], e["objects"])
                     for i, e in zip(ids, examples)]
            out["attribute_accuracy"] = sum(named) / len(named)
        return out


@register("vqa")
class VQAEvaluator(Evaluator):
    """Examples: ``{"id", "image", "question": str, "answers": [10 human answers]}``, optionally
    with ``"answer_type"`` / ``"question_type"`` (VQAv2's fields; ``shapes`` has them too): then
    the mean accuracy per type is reported as well, as ``answer_type/<type>`` and
    ``question_type/<type>`` (characters other than letters, digits, ``_.-`` become ``_``), the
    breakdown of the official VQAv2 evaluation."""

    config_options = (*Evaluator.config_options, "text_sampling", "answer_max_tokens")

    def predict(self, pipe: Any, batch: Sequence[Example], seeds: Sequence[int]) -> list[str]:
        questions = [e["question"] for e in batch]
        return pipe.answer(stack_images(batch), questions, steps=self.steps, seed=list(seeds),
                           sampling=self.options.get("text_sampling", "multinomial"),
                           max_tokens=self.options.get("answer_max_tokens") or None)

    def score(self, predictions: Mapping[str, Any], examples: Sequence[Example]) -> dict[str, float]:
        answers = {str(e["id"]): list(e["answers"]) for e in examples}
        mean, per = vqa_score({i: predictions[i] for i in answers}, answers,
                              normalize_humans=True)
        out = {"vqa_accuracy": mean}
        for field in ("answer_type", "question_type"):
            groups: dict[str, list[float]] = {}
            for e in examples:
                if e.get(field):
                    groups.setdefault(metric_slug(e[field]), []).append(per[str(e["id"])])
            out.update({f"{field}/{t}": sum(v) / len(v) for t, v in sorted(groups.items())})
        return out


def metric_slug(name: str) -> str:
    """``name`` as a metric-name component: ``yes/no`` -> ``yes_no``, ``what is the`` ->
    ``what_is_the``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name.strip())
