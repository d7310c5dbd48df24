"""Llama, Mistral, Qwen2, Qwen3, GPT-NeoX/Pythia and Gemma-2, loaded from folders that ``transformers``
wrote with ``save_pretrained``: logits against ``transformers`` (1e-5 relative to the largest logit),
the gated forward against the float64 plain reference, gate gradients against finite differences."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import acdc_jax as aj  # noqa: E402
from acdc_jax.models import LoadError, build_model, expected_shapes, load_model, model_arrays  # noqa: E402

from . import reference  # noqa: E402

VOCAB = 37
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, initializer_range=0.2)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
# name -> (config class, options): GQA with 2 and 4 query heads per kv head, a window shorter than the
# prompts, biases, q/k norm with head_dim != d_model / n_heads, tied and untied unembeddings, parallel
# and sequential GPT-NeoX with partial rotary, Qwen2 sliding only in the layers >= max_window_layers,
# Gemma-2 with soft-capping on both, query_pre_attn_scalar != head_dim, its default alternation (layer 0
# slides) and the reverse one from layer_types. Gemma2Config's pad_token_id=0 would make transformers zero
# that token's embedding row: a residual of exact zeros, which every RMSNorm maps to rounding noise times
# 1/sqrt(eps) (the gated run's x~ + (x - x~) is not exactly 0), so the Gemma cases have no pad token.
GEMMA = dict(pad_token_id=None)
CASES = {
    "llama-gqa-llama3-tied": ("LlamaConfig", dict(num_key_value_heads=2, rope_scaling=LLAMA3, tie_word_embeddings=True)),
    "llama-mqa-biases": ("LlamaConfig", dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True)),
    "mistral-window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=3, head_dim=8)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "qwen3-qk-norm": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=12, tie_word_embeddings=True)),
    "pythia-parallel": ("GPTNeoXConfig", dict(rotary_pct=0.25)),
    "neox-sequential": ("GPTNeoXConfig", dict(use_parallel_residual=False, rotary_pct=0.5)),
    "qwen2-window-layers": ("Qwen2Config", dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=3,
                                                max_window_layers=1)),
    "gemma2-window-softcap": ("Gemma2Config", dict(GEMMA, num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=20,
                                                   sliding_window=3, attn_logit_softcapping=1.5,
                                                   final_logit_softcapping=2.0)),
    "gemma2-layer-types-untied": ("Gemma2Config", dict(GEMMA, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                                                       sliding_window=4, layer_types=["full_attention", "sliding_attention"],
                                                       attn_logit_softcapping=None, final_logit_softcapping=None,
                                                       tie_word_embeddings=False)),
}
N_POS = 7  # longer than the sliding window


def _hf_model(case, seed=0):
    cls, options = CASES[case]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**COMMON, **options)).eval()
    with torch.no_grad():  # norms and biases away from their 1 / 0 initialisation, so that they matter
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (folder written by save_pretrained, the transformers model)."""
    out = {}
    for case in CASES:
        model = _hf_model(case)
        folder = tmp_path_factory.mktemp(case)
        model.save_pretrained(folder)
        out[case] = (folder, model)
    return out


def _tokens(seed, batch=3):
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, N_POS))


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.double().numpy()


def _assert_logits_close(ours, theirs):
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(saved, case):
    folder, hf = saved[case]
    model = load_model(folder)
    tokens = _tokens(0)
    _assert_logits_close(model(tokens), _hf_logits(hf, tokens))


def test_what_each_option_changes_is_visible():
    """The options the parity cases exercise change the logits (so parity on them is a real check)."""
    tokens = _tokens(0)
    gemma = "gemma2-window-softcap"
    for case, field, off in [("mistral-window", "sliding_window", None), ("llama-gqa-llama3-tied", "rope_scaling", None),
                             ("pythia-parallel", "parallel", False), ("neox-sequential", "rotary_dim", 2),
                             ("qwen2-window-layers", "sliding_window", None), ("qwen2-window-layers", "sliding_window", 3),
                             (gemma, "sliding_window", None), (gemma, "sliding_window", 3), (gemma, "attn_softcap", None),
                             (gemma, "logit_softcap", None), (gemma, "attn_scale", math.sqrt(12)),
                             (gemma, "embed_multiplier", 1.0), (gemma, "normalization", "rms"), (gemma, "post_norms", False),
                             ("gemma2-layer-types-untied", "sliding_window", (4, None))]:
        base = aj.init_model(_config(case), jax.random.PRNGKey(0), std=0.3)
        config = dataclasses.replace(base.config, **{field: off})
        arrays = model_arrays(base)  # without post norms: no ln*_post, and a zero b_O
        changed = build_model(config, {k: arrays.get(k, np.zeros(shape, np.float32)) for k, shape in expected_shapes(config).items()})
        assert np.abs(np.asarray(base(tokens)) - np.asarray(changed(tokens))).max() > 1e-3, (case, field, off)


def test_sliding_layers_from_configs_without_layer_types():
    """Files older than transformers 5 have no ``layer_types``: Gemma-2 slides in its even layers,
    Qwen2/3 in the layers >= max_window_layers (all of them when that is 0), Mistral in every layer."""
    def windows(cls, n_layers=4, **options):
        from acdc_jax.models.families import FAMILIES

        hf = getattr(transformers, cls)(**(COMMON | dict(num_hidden_layers=n_layers, num_key_value_heads=2)), **options).to_dict()
        hf.pop("layer_types", None)
        return FAMILIES[hf["model_type"]].config_from_hf(hf).layer_windows

    assert windows("Gemma2Config", sliding_window=5) == (5, None, 5, None)
    assert windows("Qwen2Config", use_sliding_window=True, sliding_window=5, max_window_layers=3) == (None, None, None, 5)
    assert windows("Qwen3Config", use_sliding_window=True, sliding_window=5, max_window_layers=0) == (5,) * 4
    assert windows("Qwen2Config", use_sliding_window=False, sliding_window=5, max_window_layers=0) == (None,) * 4
    assert windows("MistralConfig", sliding_window=5) == (5,) * 4


def test_readme_gemma2_edge_counts():
    """The README's edge counts for Gemma-2 are the graph's, for the shape transformers' Gemma2Config
    defaults to (gemma-2-2b) and gemma-2-9b's."""
    import re
    from pathlib import Path

    from acdc_jax.models.families import FAMILIES

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    shapes = {"Gemma-2-2B": {}, "Gemma-2-9B": dict(num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
                                                   hidden_size=3584, intermediate_size=14336)}
    for name, options in shapes.items():
        config = FAMILIES["gemma2"].config_from_hf(transformers.Gemma2Config(**options).to_dict())
        row = re.search(rf"\| {name} \| (\d+) x (\d+) \| ([\d,]+) \(([\d,]+)\) \|", readme)
        layers, heads, edges, with_internal = (int(g.replace(",", "")) for g in row.groups())
        assert (layers, heads) == (config.n_layers, config.n_heads)
        assert edges == aj.Graph.from_model(config).n_edges
        assert with_internal == aj.Graph.from_model(config, internal_edges=True).n_edges


def test_gemma2_post_norm_scale_is_the_runs_own(saved):
    """After a post norm a head's source is its share of the normalised sum with the scale of the heads
    that run computed. Gating head a0.0's q/k/v inputs to the corrupted embedding (every other gate 1)
    must therefore equal transformers with head 0's mixed values (o_proj's input) replaced by the
    corrupted run's: its post_attention_layernorm then normalises the patched total."""
    folder, hf = saved["gemma2-window-softcap"]
    model = load_model(folder)
    clean, corrupt = _tokens(0), _tokens(1)
    graph = aj.Graph.from_model(model)
    run = aj.GatedRun(model, graph, clean, aj.make_ablation(model, "corrupt", corrupt_tokens=corrupt))
    gates = np.ones(graph.n_gates, np.float32)
    gates[graph.indices([f"embed->a0.0.{t}" for t in "qkv"])] = 0.0
    ours = np.asarray(run(gates))

    o_proj, width = hf.model.layers[0].self_attn.o_proj, model.config.d_head
    corrupted = {}
    grab = o_proj.register_forward_pre_hook(lambda module, args: corrupted.setdefault("z", args[0].clone()))
    _hf_logits(hf, corrupt)
    grab.remove()

    def patch(module, args):
        z = args[0].clone()
        z[..., :width] = corrupted["z"][..., :width]
        return (z,)

    hook = o_proj.register_forward_pre_hook(patch)
    expected = _hf_logits(hf, clean)
    hook.remove()
    _assert_logits_close(ours, expected)
    assert np.abs(expected - _hf_logits(hf, clean)).max() > 1e-2 * np.abs(expected).max()  # the patch matters


def _config(case):
    from acdc_jax.models.families import FAMILIES

    cls, options = CASES[case]
    hf = getattr(transformers, cls)(**COMMON, **options).to_dict()
    return FAMILIES[hf["model_type"]].config_from_hf(hf, name=case)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_and_sharded_files(tmp_path, dtype):
    """bf16/fp16 safetensors split into shards (``model.safetensors.index.json``) load as float32."""
    hf = _hf_model("llama-gqa-llama3-tied").to(getattr(torch, dtype))
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = load_model(tmp_path)
    if dtype == "float16":  # a missing shard is named
        shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
        shard.rename(tmp_path / "moved")
        with pytest.raises(LoadError, match=f"lists shards that are not in .*{shard.name}"):
            load_model(tmp_path)
        (tmp_path / "moved").rename(shard)
    assert model.dtype == jnp.float32
    # the reference: transformers reading the same files into float32 (``hf.float()`` would keep
    # the rotary frequencies rounded to half precision)
    wide = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = _tokens(0)
    _assert_logits_close(model(tokens), _hf_logits(wide, tokens))


def test_torch_bin_files(tmp_path):
    hf = _hf_model("pythia-parallel")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    hf.config.save_pretrained(tmp_path)
    tokens = _tokens(0)
    _assert_logits_close(load_model(tmp_path)(tokens), _hf_logits(hf, tokens))


@pytest.mark.parametrize("case", sorted(CASES))
def test_gated_forward_on_every_family(saved, case):
    """All gates 1 = the model; all gates 0 = the corrupted model; random gates in float64 = the plain
    reference (edge and node level); d(logits . w)/d gates = central finite differences."""
    model = load_model(saved[case][0])
    clean, corrupt = _tokens(0), _tokens(1)
    graph = aj.Graph.from_model(model)
    if model.config.parallel:
        assert not any(e.startswith("a1.") and e.endswith("->mlp1") for e in graph.edges)
    run = aj.GatedRun(model, graph, clean, aj.make_ablation(model, "corrupt", corrupt_tokens=corrupt))
    _assert_logits_close(run(graph.gates(1.0)), np.asarray(model(clean), np.float64))
    _assert_logits_close(run(graph.gates(0.0)), np.asarray(model(corrupt), np.float64))
    with jax.enable_x64(True):
        wide = model.astype(jnp.float64)
        rng = np.random.RandomState(3)
        for level in ("edge", "node"):
            g = aj.Graph.from_model(wide, level=level)
            run64 = aj.GatedRun(wide, g, clean, aj.make_ablation(wide, "corrupt", corrupt_tokens=corrupt))
            gates = rng.uniform(size=g.n_gates)
            expected = reference.gated_logits(wide, g, clean, gates, run64.ablation.values)
            np.testing.assert_allclose(run64(jnp.asarray(gates)), expected, atol=1e-10, rtol=1e-10)
        run64 = aj.GatedRun(wide, graph, clean, aj.make_ablation(wide, "corrupt", corrupt_tokens=corrupt))
        w = jnp.asarray(rng.normal(size=np.shape(run64(graph.gates(1.0, jnp.float64)))))
        f = lambda gates: (run64(gates) * w).sum()  # noqa: E731
        at = jnp.asarray(rng.uniform(size=graph.n_gates))
        grad = np.asarray(jax.grad(f)(at))
        eps = 1e-6
        for i in rng.choice(graph.n_gates, 4, replace=False):
            step = jnp.zeros(graph.n_gates).at[i].set(eps)
            fd = (f(at + step) - f(at - step)) / (2 * eps)
            np.testing.assert_allclose(grad[i], fd, rtol=1e-6, atol=1e-8)
        assert np.abs(grad).max() > 1e-3


def test_unsupported_configs_fail_clearly(tmp_path):
    def write(cls, **options):
        getattr(transformers, cls)(**COMMON, **options).save_pretrained(tmp_path)

    write("Gemma2Config", attention_bias=True)
    with pytest.raises(LoadError, match="attention_bias=true is not supported"):
        load_model(tmp_path)
    write("Gemma2Config", use_bidirectional_attention=True)
    with pytest.raises(LoadError, match="use_bidirectional_attention=true is not supported"):
        load_model(tmp_path)
    write("LlamaConfig", rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16})
    with pytest.raises(LoadError, match="rope type 'yarn' is not supported"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    with pytest.raises(LoadError, match="lacks the field 'hidden_size'"):
        load_model(tmp_path)
    write("Phi3Config")
    with pytest.raises(LoadError, match="unknown architecture: model_type='phi3'.*gemma2, gpt_neox, llama, mistral"):
        load_model(tmp_path)


def test_atp_star_qk_fix_is_exact_with_rotary_gqa_and_qk_norm():
    """One attention layer, no LayerNorm, logit_diff: linear after the softmax, so AtP*'s QK fix is
    the exact effect of every q/k edge, also when the keys are rotated, shared by two query heads and
    RMS-normed (it must recompute the pattern as the forward does)."""
    from acdc_jax.methods import Problem
    from acdc_jax.methods._gradients import exact_unit_effects
    from acdc_jax.methods.atp_star import atp_estimates

    from .test_gradient_methods import _random_model, _toy_task

    cfg = aj.TransformerConfig(n_layers=1, n_heads=4, n_kv_heads=2, d_model=8, d_head=4, d_vocab=11, n_ctx=6,
                               normalization=None, tied_unembed=False, positional="rotary", qk_norm=True)
    with jax.enable_x64(True):
        model = _random_model(cfg, 1, 1.0)
        problem = Problem.build(model, _toy_task(model, "logit_diff", seed=1), metric="logit_diff", ablation="corrupt")
        exact = exact_unit_effects(problem)
        atp = atp_estimates(problem)[0]
    qk = np.array([e.endswith((".q", ".k")) for e in problem.graph.edges])
    assert np.abs(exact[qk]).max() > 1e-2
    np.testing.assert_allclose(atp, exact, rtol=1e-9, atol=1e-9)


# one model with every family feature at once: GQA, q/k norm, partial rotary, a sliding window in layer 0
# only, RMSNorm before and after the sublayers (plain, w: Gemma-2's (1 + w) is in its parity cases),
# soft-capped scores and logits, a scaled embedding, gated SiLU MLP, parallel blocks
ALL_FEATURES = aj.TransformerConfig(
    n_layers=2, n_heads=4, n_kv_heads=2, d_model=16, d_head=4, d_mlp=24, d_vocab=19, n_ctx=8, act_fn="silu",
    normalization="rms", post_norms=True, positional="rotary", rotary_dim=2, qk_norm=True, gated_mlp=True,
    parallel=True, sliding_window=(4, None), attn_softcap=2.0, logit_softcap=3.0, embed_multiplier=2.0,
    tied_unembed=False,
)


def _all_features_task(n_prompts=4, seed=0):
    from acdc_jax.tasks import Task

    rng = np.random.RandomState(seed)
    n_pos = ALL_FEATURES.n_ctx - 1
    clean = rng.randint(0, ALL_FEATURES.d_vocab, (n_prompts, n_pos))
    answers = rng.randint(0, ALL_FEATURES.d_vocab, (n_prompts, 1))
    return Task(name="random-logit-diff", clean=clean, corrupt=rng.randint(0, ALL_FEATURES.d_vocab, clean.shape),
                positions=np.full((n_prompts, 1), n_pos - 1), metric="logit_diff", answers=answers,
                wrong_answers=(answers + 1) % ALL_FEATURES.d_vocab,
                labels={"A": np.full(n_prompts, 2), "END": np.full(n_prompts, n_pos - 1)})


def test_acdc_equals_the_plain_loop_on_a_model_with_every_family_feature():
    from acdc_jax import acdc
    from acdc_jax.methods import Problem

    from .test_acdc import plain_acdc

    model = aj.init_model(ALL_FEATURES, jax.random.PRNGKey(0), std=0.5)
    problem = Problem.build(model, _all_features_task(), metric="kl")
    gap = problem.ablated_value() - problem.clean_value()
    sizes = []
    for threshold in (0.01 * gap, 0.05 * gap):
        expected = plain_acdc(problem, threshold)
        circuit = acdc(problem, threshold=threshold, max_batch=8)
        assert set(circuit.kept) == expected, (threshold, set(circuit.kept) ^ expected)
        sizes.append(len(expected))
    assert any(0 < size < problem.graph.n_gates for size in sizes), sizes


METHOD_OPTIONS = {"acdc": dict(threshold=0.01), "acdc-nodes": dict(threshold=0.01), "path-patching": dict(threshold=0.01),
                  "learned-mask": dict(steps=20), "learned-mask-nodes": dict(steps=20), "node-patching": {}}


def test_every_method_runs_on_a_model_with_every_family_feature():
    """Every registered method on one layer of the all-features model (one problem per granularity,
    so that the methods share compilations)."""
    from acdc_jax.methods import Problem, get_method, method_names

    model = aj.init_model(dataclasses.replace(ALL_FEATURES, n_layers=1, sliding_window=4), jax.random.PRNGKey(0), std=0.5)
    task = _all_features_task()
    problems = {level: Problem.build(model, task, level=level) for level in ("edge", "node")}
    assert not any(e.startswith("a0.") and e.endswith("->mlp0") for e in problems["edge"].graph.edges)  # parallel
    for name in method_names():
        spec = get_method(name)
        circuit = spec.fn(problems[spec.level], **METHOD_OPTIONS.get(name, dict(top_n=5)))
        assert circuit.graph.level == spec.level, name
        scores = np.asarray(circuit.scores, np.float64)
        assert np.any(np.isfinite(scores)) and np.nanmax(np.abs(scores)) > 0, name
        assert np.isfinite(circuit.metric_value), name
