"""The lmms-eval model ``vlm_reroute``: any supported checkpoint, with a token-reduction method applied.

Registered through the ``lmms_eval.models`` entry point (:mod:`.manifest`), so no fork, patch or
environment variable is needed::

    python -m lmms_eval --model vlm_reroute \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=pdrop,reroute=true,tier=64 --tasks pope

Two classes share one implementation: :class:`VlmReroute` (chat, the default: lmms-eval hands it each
document's messages) and :class:`VlmRerouteSimple` (``--force_simple``; it also answers
``loglikelihood`` requests, which lmms-eval 0.7 issues only to simple models). Batches are left-padded;
a sample gets the same answer alone or batched, because the method decides per sample and tier (avg_T)
budgets are solved per image. The method arguments are read by ``MethodSpec.from_args``
(``vlm_reroute.methods.spec``), the one parser every entry point shares.

Each answer carries its cost (:mod:`.cost`) in its ``token_counts`` (written by ``--log_samples``), and
``cost_log=path.jsonl`` appends one line per sample.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.protocol import ChatMessages
from tqdm import tqdm

from ..methods.spec import MethodSpec
from ..methods.spec_parsing import refuse_unknown_args
from .checkpoint import load_vlm
from .cost import PrefillTimer, model_shape, peak_memory, sample_costs, summarise
from .generation import Force, count_generated, log_warning, reported_clamps, truncate
from .inputs import Conversation, InputBuilder, simple_conversation
from .parallel import close_group_at_exit, group_up

_LMMS_EXTRA = ("max_batch_size",)  # passed by lmms-eval's CLI, unused here
_DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class CostTokenCounts(TokenCounts):
    """lmms-eval's per-sample token counts plus this sample's cost (key ``vlm_reroute`` in the samples).

    So each answer's :class:`~vlm_reroute.eval.cost.SampleCost` travels in lmms-eval's sample files.
    """

    cost: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = super().to_dict()
        if self.cost is not None:
            out["vlm_reroute"] = self.cost
        return out


@dataclass
class _Request:
    index: int
    conversation: Conversation
    gen_kwargs: dict[str, Any]
    task: str
    split: str
    doc_id: int


class VlmRerouteSimple(lmms):
    """lmms-eval model ``vlm_reroute``, simple interface (``--force_simple``).

    Any supported checkpoint with a registered token-reduction method applied, as prune or as
    Reroute (arXiv 2606.12412), evaluated by lmms-eval (arXiv 2407.12772). It also answers
    ``loglikelihood`` requests, which lmms-eval 0.7 issues only to simple models. See the module
    docstring for the arguments.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str = "none",
        reroute: bool | str = False,
        tier: float | str | None = None,
        ratio: float | str | None = None,
        flops_fraction: float | str | None = None,
        layers: str | None = None,
        keep: str | None = None,
        withdraw_at: int | str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = "sdpa",
        device: str | None = None,
        device_map: str | None = None,
        batch_size: int | str = 1,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        max_new_tokens: int | None = None,
        cost_log: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        refuse_unknown_args(kwargs, _LMMS_EXTRA, VlmRerouteSimple.__init__)
        args = (method, reroute, tier, ratio, flops_fraction, layers, keep, withdraw_at)
        self.spec = MethodSpec.from_args(*args)
        try:
            self.batch_size_per_gpu = int(batch_size)
        except ValueError:
            raise ValueError(f"batch_size={batch_size!r}: give a positive integer") from None
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size={batch_size!r}: give a positive integer")
        self.max_new_tokens = max_new_tokens
        self._setup_device(device, device_map)
        self._model = load_vlm(pretrained, dtype, attn_implementation, device_map)
        if not device_map:
            self._model.to(self._device)
        self.pretrained = pretrained
        self.inputs = InputBuilder.from_pretrained(pretrained, self._model, min_pixels, max_pixels)
        self.shape = model_shape(self._model)
        self._method = self.spec.build()
        if self._method is not None:
            self._method.check_depth(self.shape.num_layers)
        self.costs: list[dict[str, Any]] = []
        self.cost_log = self._rank_path(cost_log)
        self._timer = PrefillTimer(self._model)
        self.reusable = False  # True: survive lmms-eval's clean() to run several evaluations
        #: where a clamped budget's one-line warning goes (lmms-eval's log; the CLI prints ``warning:``)
        self.on_warning: Callable[[str], None] = log_warning
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ lmms-eval plumbing
    def _setup_device(self, device: str | None, device_map: str | None) -> None:
        from accelerate import Accelerator

        self.accelerator = acc = Accelerator()
        cuda = torch.cuda.is_available()
        rank, world, local = acc.process_index, acc.num_processes, acc.local_process_index
        if group_up():
            # torchrun on CPU: the process group exists while accelerate reports a single process
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            local = int(os.environ.get("LOCAL_RANK", rank))
        close_group_at_exit()  # destroy the group before the interpreter's teardown (if one is up, or may be)
        if world > 1:
            self._device = torch.device(f"cuda:{local}" if cuda else "cpu")
            self._rank, self._world_size = rank, world
        else:
            name = device or ("cuda" if cuda else "cpu")
            if name.startswith("cuda") and not cuda:
                raise ValueError(f"device={name!r} but CUDA is not available; pass --device cpu")
            self._device = torch.device(name)

    def _rank_path(self, path: str | None) -> Path | None:
        if not path:
            return None
        p = Path(path)
        return p.with_name(f"{p.stem}.rank{self._rank}{p.suffix}") if self._world_size > 1 else p

    @property
    def model(self) -> Any:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self.inputs.tokenizer

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def clean(self) -> None:
        """lmms-eval frees the model after each evaluation; a :attr:`reusable` model stays loaded."""
        if not self.reusable:
            super().clean()

    def set_method(self, spec: MethodSpec) -> None:
        """Switch the method without reloading the model (the grid runner's cells share one model)."""
        self.spec = spec
        self._method = spec.build()

    # ------------------------------------------------------------------ methods
    @contextmanager
    def _applied(self) -> Iterator[Any]:
        """The method applied to the model (its trace), or nothing for vanilla (``None``); a budget the
        method cannot reach is reported once through :attr:`on_warning` (lmms-eval silences warnings)."""
        if self._method is None:
            yield None
        else:
            with reported_clamps(self.on_warning, self._warned), self._method(self._model) as trace:
                yield trace

    # ------------------------------------------------------------------ generation
    def _generation_kwargs(self, gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        gen = dict(gen_kwargs)
        until = gen.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen.pop("temperature", 0) or 0)
        out: dict[str, Any] = {
            "max_new_tokens": int(self.max_new_tokens or gen.pop("max_new_tokens", _DEFAULT_MAX_NEW_TOKENS)),
            "num_beams": int(gen.pop("num_beams", 1) or 1),
            "do_sample": temperature > 0,
        }
        if temperature > 0:
            out["temperature"] = temperature
            if gen.get("top_p") is not None:
                out["top_p"] = float(gen["top_p"])
        tokenizer = self.tokenizer
        out["pad_token_id"] = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        if self._model.generation_config.eos_token_id is None and tokenizer.eos_token_id is not None:
            out["eos_token_id"] = tokenizer.eos_token_id
        return out, until

    def _run(self, requests: list[_Request]) -> list[GenerationResult]:
        """Answer requests in batches of the same generation settings."""

        keys = {r.index: json.dumps(r.gen_kwargs, sort_keys=True, default=str) for r in requests}
        ordered = sorted(requests, key=lambda r: (keys[r.index], r.index))
        batches: list[list[_Request]] = []
        for _, grouped in itertools.groupby(ordered, key=lambda r: keys[r.index]):
            members = list(grouped)
            batches += [members[i : i + self.batch_size] for i in range(0, len(members), self.batch_size)]

        results: dict[int, GenerationResult] = {}
        records: list[dict[str, Any]] = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc=f"vlm_reroute {self.spec.label}")
        for batch in batches:
            for request, result in zip(batch, self._generate(batch), strict=True):
                results[request.index] = result
                records.append(result.token_counts.cost)
            bar.update(len(batch))
        bar.close()
        if records:
            means = summarise(records)
            seconds = sum(r["generate_seconds"] for r in records)
            tokens = sum(r["output_tokens"] for r in records)
            log_metrics(
                total_elapsed_time=seconds,
                total_gen_tokens=tokens,
                avg_speed=tokens / seconds if seconds > 0 else 0.0,
                additional_metrics={"rank": self.rank, **{f"vlm_reroute_{k}": v for k, v in means.items()}},
            )
        return [results[r.index] for r in sorted(requests, key=lambda r: r.index)]

    def _generate(self, batch: list[_Request]) -> list[GenerationResult]:
        gen, until = self._generation_kwargs(batch[0].gen_kwargs)
        inputs = self.inputs([r.conversation for r in batch])
        inputs = {k: v.to(self._device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        start = time.perf_counter()
        with (
            torch.no_grad(),
            peak_memory(self._model) as peak,
            self._timer() as timer,
            self._applied() as trace,
        ):
            output = self._model.generate(**inputs, **gen)
        seconds = time.perf_counter() - start
        width = inputs["input_ids"].shape[1]
        new_tokens = output[:, width:]
        texts = self.inputs.decode(new_tokens)
        if (image_token_id := self.inputs.image_token_id) is None:  # the cost records count them
            raise ValueError(f"{type(self._model).__name__}'s config names no image_token_id")
        costs = sample_costs(
            self.shape,
            self.spec.name,
            inputs["input_ids"].cpu(),
            inputs["attention_mask"].cpu(),
            image_token_id,
            trace,
            timer.ms or 0.0,
            (peak[0], peak[1]),
        )
        results = []
        for request, text, ids, cost in zip(batch, texts, new_tokens, costs, strict=True):
            text = truncate(text, until)
            n_out = count_generated(ids, gen.get("pad_token_id"), gen.get("eos_token_id"))
            record = {
                "task": request.task,
                "split": request.split,
                "doc_id": request.doc_id,
                "spec": self.spec.model_args(),
                "rank": self.rank,
                **cost.to_dict(),
                "output_tokens": n_out,
                "generate_seconds": seconds / len(batch),
            }
            self.costs.append(record)
            self._write_cost(record)
            counts = CostTokenCounts(input_tokens=cost.text_tokens + cost.visual_tokens, output_tokens=n_out)
            counts.cost = record
            results.append(GenerationResult(text=text, token_counts=counts))
        return results

    def _write_cost(self, record: dict[str, Any]) -> None:
        if self.cost_log is not None:
            self.cost_log.parent.mkdir(parents=True, exist_ok=True)
            with self.cost_log.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        batch = []
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else []
            batch.append(
                _Request(index, simple_conversation(context, visuals or []), gen_kwargs, task, split, doc_id)
            )
        return self._run(batch)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "vlm_reroute answers single-round generate_until and loglikelihood requests"
        )

    # ------------------------------------------------------------------ loglikelihood
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after the routed prompt, and whether greedy decoding gives it.

        The prompt is prefilled with the method (decisions see the prompt only, never the answer) and the
        continuation is teacher-forced through ``generate()``'s own decode steps, so the cache, positions
        and masks are those of generation.
        """
        out = []
        for request in tqdm(requests, disable=self.rank != 0, desc="vlm_reroute loglikelihood"):
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            visuals = doc_to_visual(doc) if doc_to_visual is not None else []
            conversation = simple_conversation(context, visuals or [])
            out.append(self._score(conversation, str(continuation)))
        return out

    def _score(self, conversation: Conversation, continuation: str) -> tuple[float, bool]:
        inputs = self.inputs([conversation])
        inputs = {k: v.to(self._device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        target = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if target.numel() == 0:
            return 0.0, True
        gen, _ = self._generation_kwargs({"max_new_tokens": int(target.numel())})
        gen.update(
            max_new_tokens=int(target.numel()),
            min_new_tokens=int(target.numel()),
            do_sample=False,
            num_beams=1,
            logits_processor=[Force(target.tolist())],
            output_logits=True,
            return_dict_in_generate=True,
        )
        gen.pop("eos_token_id", None)
        with torch.no_grad(), self._applied():
            output = self._model.generate(**inputs, **gen)
        logits = torch.stack(output.logits, dim=1)[0].float()  # (T, vocab), before the forcing processor
        logprobs = torch.log_softmax(logits, dim=-1)
        picked = logprobs.gather(1, target.to(logits.device)[:, None]).sum()
        greedy = bool((logits.argmax(-1).cpu() == target).all())
        return float(picked), greedy


class VlmReroute(VlmRerouteSimple):
    """lmms-eval model ``vlm_reroute``, chat interface (the default): see :class:`VlmRerouteSimple`."""

    is_simple = False

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        batch = []
        for index, request in enumerate(requests):
            _context, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
            messages = ChatMessages(messages=doc_to_messages(self._doc(task, split, doc_id)))
            batch.append(_Request(index, messages.to_hf_messages(), gen_kwargs, task, split, doc_id))
        return self._run(batch)


__all__ = ["CostTokenCounts", "VlmReroute", "VlmRerouteSimple", "load_vlm"]
