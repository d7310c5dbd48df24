"""Weights split over the mesh's model axis (8 simulated CPU devices): safetensors shards read straight to their
devices equal the whole model, and the sharded evaluations, gradients and methods equal one device's on a small
model of each family."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import acdc_jax as aj  # noqa: E402
from acdc_jax.methods import Problem  # noqa: E402
from acdc_jax.models import forward, load_model, model_arrays  # noqa: E402
from acdc_jax.models._sharded import LazyTensor, parameter_specs  # noqa: E402
from acdc_jax.sharding import evaluate_configs, make_mesh, shard_model, shard_problem  # noqa: E402
from acdc_jax.tasks import Task  # noqa: E402
from acdc_jax.tasks import _task as task_module  # noqa: E402

from . import reference  # noqa: E402
from .test_families import VOCAB, _hf_model  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")

# family -> (folder builder, mesh configs x prompts x model): Llama's 2 kv heads split over a model axis of 2
# (GPT-2, Gemma-2, GPT-NeoX) and replicated over one of 4 (Llama); GPT-2's even vocabulary splits too.
MESHES = {"gpt2": (2, 2, 2), "llama-gqa-llama3-tied": (2, 1, 4), "gemma2-window-softcap": (2, 2, 2),
          "pythia-parallel": (2, 2, 2)}


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=16, vocab_size=VOCAB + 1, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for family in MESHES:
        hf = _gpt2() if family == "gpt2" else _hf_model(family)
        out[family] = tmp_path_factory.mktemp(family)
        hf.save_pretrained(out[family])
    return out


def _task():
    rng = np.random.RandomState(0)
    clean = rng.randint(0, VOCAB, (4, 5))
    return Task(name="copy", clean=clean, corrupt=rng.randint(0, VOCAB, clean.shape), positions=np.full((4, 1), 4),
                metric="logit_diff", answers=clean[:, 3:4], wrong_answers=clean[:, 2:3])


def _problems(folder, mesh, monkeypatch):
    """The task's problem on the whole model, and on the model loaded onto ``mesh`` (prompts split too)."""
    # the clean logits in one compiled forward, not op by op (seconds of test time; the same inputs on both sides)
    monkeypatch.setattr(task_module, "forward", eqx.filter_jit(forward))
    problem = Problem.build(load_model(folder), _task(), metric="logit_diff", ablation="zero")
    placed = eqx.tree_at(lambda p: p.run.model, problem, load_model(folder, mesh=mesh))
    return problem, shard_problem(placed, mesh)


@pytest.mark.parametrize("family", sorted(MESHES))
def test_sharded_family_equals_one_device(folders, family, monkeypatch):
    """Loaded straight onto the mesh, the weights are the whole model's, split as the rule says, and
    ACDC's evaluation of gate configurations over all three axes equals one device's."""
    mesh = make_mesh(*MESHES[family])
    problem, sharded = _problems(folders[family], mesh, monkeypatch)
    whole, placed = problem.model, sharded.model
    specs = parameter_specs(whole.config, mesh.shape["model"])
    for (name, a), (_, b) in zip(model_arrays(whole).items(), model_arrays(placed).items()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    for path, leaf in jax.tree_util.tree_leaves_with_path(placed):
        name = ".".join(str(getattr(p, "name", p)) for p in path)
        assert leaf.sharding.spec == specs[name], name
    assert specs["blocks.attn.W_Q"] == P(None, "model", None, None) and specs["blocks.mlp.W_out"] == P(None, "model", None)
    kv_split = whole.config.kv_heads % mesh.shape["model"] == 0
    assert (specs["blocks.attn.W_K"] == P(None, "model", None, None)) == kv_split
    assert (specs["embed.W_E"] == P("model", None)) == (whole.config.d_vocab % mesh.shape["model"] == 0)

    # against the plain float64 reference of the gated model (no compilation: the test's time is compiling)
    gates = np.random.RandomState(1).uniform(size=(2, problem.graph.n_gates))
    run = problem.run
    expected = [problem.metric(jnp.asarray(reference.gated_logits(whole, problem.graph, run.tokens, g,
                                                                   run.ablation.values)[:, 4:5], jnp.float32),
                               problem.inputs) for g in gates]
    np.testing.assert_allclose(evaluate_configs(sharded, gates, mesh, chunk_per_device=1), expected, rtol=1e-5, atol=1e-5)


def test_each_device_reads_only_its_shard(folders, monkeypatch):
    """The query projection of a 4-head model over a model axis of 4: each read is one head's rows of one layer."""
    boxes = []
    read_box = LazyTensor._read_box

    def recording(self, box):
        part = read_box(self, box)
        boxes.append((self.name, part.size, int(np.prod(self.stored_shape))))
        return part

    monkeypatch.setattr(LazyTensor, "_read_box", recording)
    placed = load_model(folders["llama-gqa-llama3-tied"], mesh=make_mesh(2, 1, 4))
    q_reads = [(size, total) for name, size, total in boxes if name.endswith("q_proj.weight")]
    assert q_reads and all(size == total // 4 for size, total in q_reads)
    assert len(q_reads) == 2 * 4  # 2 layers x 4 distinct shards: replicas over the other axes share one read
    assert placed.mesh is not None and placed.blocks.attn.W_Q.sharding.shard_shape((2, 4, 32, 8)) == (2, 1, 32, 8)


def test_model_axis_errors_are_clear():
    cfg = aj.TransformerConfig(n_layers=1, n_heads=4, d_model=8, d_head=2, d_mlp=12, d_vocab=10, n_ctx=4)
    with pytest.raises(ValueError, match=r"12 d_mlp.*use a model axis of \[1, 2, 4\]"):
        parameter_specs(cfg, 8)
    with pytest.raises(ValueError, match="a 2 x 2 x 3 mesh needs 12 devices, 8 are given"):
        make_mesh(2, 2, 3)
    model = shard_model(aj.init_model(cfg, jax.random.PRNGKey(0)), make_mesh(4, 1, 2))
    assert model.blocks.mlp.W_in.sharding.spec == P(None, None, "model")


def test_bf16_files_and_bad_values_load_onto_a_mesh(folders, tmp_path, monkeypatch):
    from safetensors.numpy import load_file, save_file

    from acdc_jax.models import LoadError
    from acdc_jax.models import _sharded

    mesh = make_mesh(2, 1, 4)
    _hf_model("llama-gqa-llama3-tied").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    whole = load_model(tmp_path / "bf16")
    monkeypatch.setattr(_sharded, "_READ_CHUNK", 50)  # every shard read in pieces of its first axis
    placed = load_model(tmp_path / "bf16", mesh=mesh)
    for (name, a), (_, b) in zip(model_arrays(whole).items(), model_arrays(placed).items()):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(a, b, err_msg=name)
    bad = tmp_path / "nan"
    _hf_model("llama-gqa-llama3-tied").save_pretrained(bad)
    state = load_file(str(bad / "model.safetensors"))
    state["model.layers.1.self_attn.o_proj.weight"][3, 5] = np.nan
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LoadError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight in .* has 1 NaN/inf"):
        load_model(bad, mesh=mesh)
