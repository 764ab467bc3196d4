"""Running the requests' logits processors, with each request's failure kept to itself.

Two protocols are accepted (``processor_form`` tells them apart by signature):

Batched (ours): a processor is called once per step per *position* in the processor
lists: all rows whose list holds the same object at position j are passed
together as ``proc(rows [n, V], request_ids, output_token_ids)`` and it returns
the new rows [n, V] (same device, any float dtype). Rows carrying no processors
are not touched. No Python loop over the vocabulary.

Per request (vLLM's): ``proc(output_ids, logits_row) -> logits_row``, or
``proc(prompt_ids, output_ids, logits_row)``; called per row, in order, after the
batched ones. Simple to port, but a Python call per row per step.

A batched processor that is a grammar (a state machine over token ids, as Self-RAG's
``ReflectionConstraint``) may also offer its tables, so the engine can run it on the
device when the host does not know a row's last token yet (async scheduling,
engine/engine_core.py):

    proc.grammar_tables(device) -> (forbidden [S, V] bool, next_state [S, V] int64)
    proc.grammar_state(request_id, output_token_ids) -> int   (the state after them)

with ``grammar_state(rid, out + [t]) == next_state[grammar_state(rid, out), t]`` and the
row masked exactly as a call would mask it: ``forbidden[state]`` set to -inf. Such a
step calls the processor's tables instead of the processor (``apply_device_grammars``).

A processor that raises, or returns something that is not such a tensor, fails
the rows it was called for (their requests end with ``finish_reason="error"``);
the other rows go on. Two failures can only be seen on the device, NaN in a row
and a row with every token at -inf (nothing left to pick): ``row_status`` computes
them there, and the sampler reads them back with the step's tokens, so checking
costs no extra device-to-host sync.
"""
from __future__ import annotations

import torch

from engine.sampling_params import processor_form  # noqa: F401 - part of this module's API

NAN, ALL_MASKED = 1, 2          # row_status bits


class per_request:                        # noqa: N801 - used like a decorator
    """Marks ``fn`` as a vLLM-style per-request processor, whatever its parameter names:
    ``fn(output_ids, logits_row)``, or with ``with_prompt=True``
    ``fn(prompt_ids, output_ids, logits_row)``; it returns the new row [V]."""

    def __init__(self, fn, with_prompt: bool = False):
        self.fn, self.logits_processor_form = fn, "row_with_prompt" if with_prompt else "row"
        self.__qualname__ = processor_name(fn)

    def __call__(self, *args):
        return self.fn(*args)


def has_device_grammar(proc) -> bool:
    """Whether ``proc`` offers its grammar's tables (see the module docstring)."""
    return callable(getattr(proc, "grammar_tables", None)) and callable(getattr(proc, "grammar_state", None))


def apply_device_grammars(logits: torch.Tensor, seqs: list, input_ids: torch.Tensor, upload) -> torch.Tensor:
    """Every row's grammar processors on ``logits`` [B, V] in place, on the device: a row's
    state is its processor's host state before the step's input token (``input_ids`` [B],
    on the device, maybe not yet known to the host), moved by that token through the
    transition table, and the row is masked by the state's forbidden tokens. ``upload(list)``
    sends the host states (int64)."""
    groups: dict[int, tuple[object, list[int], list[int]]] = {}
    for row, seq in enumerate(seqs):
        out = seq.output_token_ids
        if not seq.num_pending:          # the input token is the output's last, known here
            out = out[:-1]
        for proc in seq.params.batched_logits_processors:
            entry = groups.setdefault(id(proc), (proc, [], []))
            entry[1].append(row)
            entry[2].append(int(proc.grammar_state(seq.request_id, out)))
    for proc, rows, states in groups.values():
        forbidden, next_state = proc.grammar_tables(logits.device)
        index = upload(rows)
        state = next_state[upload(states), input_ids.index_select(0, index)]       # [n]
        logits[index] = logits.index_select(0, index).masked_fill(forbidden[state], float("-inf"))
    return logits


def processor_name(proc) -> str:
    return getattr(proc, "__qualname__", None) or type(proc).__name__


def _bad_output(out, shape: tuple, device) -> str | None:
    """Why ``out`` cannot replace rows of ``shape`` on ``device`` (None: it can)."""
    if not isinstance(out, torch.Tensor):
        return f"returned {type(out).__name__}, not a tensor"
    if tuple(out.shape) != shape:
        return f"returned shape {tuple(out.shape)}, expected {shape}"
    if not out.is_floating_point():
        return f"returned dtype {out.dtype}, expected a float dtype"
    if out.device != device:
        return f"returned a tensor on {out.device}, expected {device}"
    return None


def apply_logits_processors(logits: torch.Tensor, seqs: list, failed: dict[int, str] | None = None
                            ) -> torch.Tensor:
    """Runs every sequence's ``logits_processors`` on its row of ``logits`` [B, V] in place.

    ``failed`` (row -> message) collects the rows whose processor raised or returned a
    bad tensor; a failed row gets no later processor. Without it, the first failure
    raises ``ValueError`` naming the processor.
    """
    lists = [s.params.batched_logits_processors for s in seqs]
    depth = max((len(procs) for procs in lists), default=0)
    V = logits.shape[1]
    for j in range(depth):
        groups: dict[int, tuple[object, list[int]]] = {}
        for row, procs in enumerate(lists):
            if j < len(procs) and (failed is None or row not in failed):
                groups.setdefault(id(procs[j]), (procs[j], []))[1].append(row)
        for proc, rows in groups.values():
            # A processor over the whole batch (the usual case) gets the logits
            # themselves, with no gather and scatter: 54 -> 21 us a call at 3 x 3016 on
            # the CPU VM (paired median); a verify step calls it once per position.
            whole = len(rows) == len(seqs)
            idx = None if whole else torch.tensor(rows, device=logits.device)
            out = _checked(proc, rows, (len(rows), V), logits.device, failed,
                           lambda: proc(logits if whole else logits[idx], [seqs[r].request_id for r in rows],
                                        [seqs[r].output_token_ids for r in rows]))
            if out is None:
                continue
            if not whole:
                logits[idx] = out.to(logits.dtype)
            elif out is not logits:
                logits.copy_(out)
    _apply_row_processors(logits, seqs, failed)
    return logits


def _checked(proc, rows: list[int], shape: tuple, device, failed: dict[int, str] | None, call):
    """``call()``'s output if it is a tensor of ``shape`` on ``device``; else None, with
    ``rows`` failed (or, without ``failed``, a ValueError naming the processor)."""
    try:
        out = call()
        problem = _bad_output(out, shape, device)
    except Exception as e:  # noqa: BLE001 - the processor's own bug: its rows fail
        problem = f"raised {type(e).__name__}: {e}"
    if problem is None:
        return out
    msg = f"logits processor {processor_name(proc)} {problem}"
    if failed is None:
        raise ValueError(msg)
    for r in rows:
        failed[r] = msg
    return None


def _apply_row_processors(logits: torch.Tensor, seqs: list, failed: dict[int, str] | None) -> None:
    """vLLM's per-request processors, after the batched ones: one call per row and
    processor, in list order (a Python call per row: their cost grows with the batch)."""
    V = logits.shape[1]
    for row, seq in enumerate(seqs):
        for proc, form in seq.params.row_logits_processors:
            if failed is not None and row in failed:
                break
            out = _checked(proc, [row], (V,), logits.device, failed,
                           lambda: (proc(seq.output_token_ids, logits[row]) if form == "row"
                                    else proc(seq.prompt_token_ids, seq.output_token_ids, logits[row])))
            if out is None:
                break
            logits[row] = out.to(logits.dtype)


def row_status(logits: torch.Tensor) -> torch.Tensor:
    """Per row, on the device: NAN if it holds a NaN, plus ALL_MASKED if every entry is -inf."""
    return (torch.isnan(logits).any(1).to(torch.int8) * NAN
            + torch.isneginf(logits).all(1).to(torch.int8) * ALL_MASKED)


def status_message(status: int) -> str | None:
    if status & NAN:
        return "its logits hold NaN after the logits processors"
    if status & ALL_MASKED:
        return "the logits processors masked every token to -inf (nothing left to sample)"
    return None
