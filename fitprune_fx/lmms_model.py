"""A FitPrune-compiled Hugging Face model as an lmms-eval model (`lmms_eval.api.model.lmms`).

lmms-eval hands the model batches of requests; each carries the task's prompt text, generation
options and a function that returns the document's images. This wrapper builds the model's own
prompt (its chat template, or the LLaVA-1.5 format without one; one image per document, other
counts refused), runs the model's processor and answers:

* `generate_until`: greedy (or sampled, as the task asks) `generate` in batches of requests with the
  same options, cut at the task's stop strings;
* `loglikelihood`, one request per forward: the negative log-likelihood of the continuation after
  the prompt (lmms-eval ranks choices by the lowest value), and whether greedy decoding would
  produce it. Continuation tokens are text after the image, never deleted, so the last rows of a
  pruned forward's logits are theirs.

It also records the prefill time of every forward that starts a sequence (`prefill_seconds`), so
the pruned and unpruned runs of `fitprune-fx eval` can be compared.

Needs the `[eval]` extra (lmms-eval 0.7.x).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from lmms_eval.api.model import lmms
from torch import nn

from fitprune_fx.calibration import build_prompt


class FitpruneLmms(lmms):
    """lmms-eval model: `model` (already compiled with a recipe, or not) and its `processor`."""

    def __init__(self, model: nn.Module, processor: Any, batch_size: int = 8) -> None:
        super().__init__()
        self.model, self.processor = model, processor
        self.batch_size_per_gpu = int(batch_size)
        self.prefill_seconds: list[float] = []
        self._started: float | None = None
        self._hooks = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after),
        ]

    # lmms-eval deletes a model's modules after a run unless told otherwise; this one is reused
    def clean(self) -> None:
        pass

    def detach(self) -> None:
        """Stop timing the model's forwards (the model outlives this wrapper)."""
        for hook in self._hooks:
            hook.remove()

    # ------------------------------------------------------------------------------ timing
    def _before(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.x names it `cache`
        starts = ids is not None and (cache is None or cache.get_seq_length() == 0)
        self._started = time.perf_counter() if starts else None

    def _after(self, module, args, output) -> None:
        if self._started is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prefill_seconds.append(time.perf_counter() - self._started)
            self._started = None

    # ---------------------------------------------------------------------------- requests
    def _docs(self, requests, visual_at: int) -> Iterator[tuple[int, list]]:
        for i, req in enumerate(requests):
            doc_to_visual, task, split, doc_id = (
                req.args[visual_at],
                req.args[-2],
                req.args[-1],
                req.args[-3],
            )
            yield i, doc_to_visual(self.task_dict[task][split][doc_id])

    def _encode(self, texts: list[str], images: list[list]) -> dict[str, torch.Tensor]:
        counts = {len(group) for group in images}
        if counts != {1}:  # the prompt holds one image placeholder: other counts would be misread
            raise ValueError(
                f"fitprune-fx eval: documents with {sorted(counts)} images; this wrapper answers tasks "
                "with exactly one image per document"
            )
        prompts = [build_prompt(self.processor, text) for text in texts]
        flat = [group[0].convert("RGB") for group in images]
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        tokenizer.padding_side = "left"  # any side is exact on 5.25; transformers 5.17's fallback needs left
        enc = self.processor(text=prompts, images=flat or None, return_tensors="pt", padding=True)
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in enc.items() if torch.is_tensor(v)}

    def _batches(self, requests) -> Iterator[list[int]]:
        """Consecutive requests with the same generation options, at most `batch_size` each."""
        batch: list[int] = []
        for i, req in enumerate(requests):
            if batch and (len(batch) == self.batch_size_per_gpu or req.args[1] != requests[batch[0]].args[1]):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        answers: list[str] = [""] * len(requests)
        visuals = dict(self._docs(requests, visual_at=2))
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        for batch in self._batches(requests):
            options = dict(requests[batch[0]].args[1])
            inputs = self._encode([requests[i].args[0] for i in batch], [visuals[i] for i in batch])
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            sample = float(options.get("temperature", 0) or 0) > 0
            out = self.model.generate(
                **inputs,
                max_new_tokens=int(options.get("max_new_tokens", 32)),
                do_sample=sample,
                **({"temperature": float(options["temperature"])} if sample else {}),
            )
            texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, text in zip(batch, texts, strict=True):
                for stop in until:
                    text = text.split(stop)[0]
                answers[i] = text.strip()
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        visuals = dict(self._docs(requests, visual_at=2))
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        results = []
        for i, req in enumerate(requests):
            context, target = req.args[0], req.args[1]
            if callable(target):
                target = target(self.task_dict[req.args[-2]][req.args[-1]][req.args[-3]])
            inputs = self._encode([context], [visuals[i]])
            cont = tokenizer(str(target), add_special_tokens=False, return_tensors="pt").input_ids
            cont = cont.to(inputs["input_ids"].device)
            full = dict(inputs)
            full["input_ids"] = torch.cat([inputs["input_ids"], cont], dim=1)
            full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(cont)], dim=1)
            logits = self.model(**full).logits[0, -cont.shape[1] - 1 : -1].float()  # rows predicting cont
            logprobs = logits.log_softmax(-1).gather(1, cont[0, :, None])[:, 0]
            greedy = bool((logits.argmax(-1) == cont[0]).all())
            results.append((float(-logprobs.sum()), greedy))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("fitprune-fx eval: multi-round generation tasks are not supported")
