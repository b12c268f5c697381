"""The Transformer: both paths agree, masks, dropout, generation with a KV cache, inference, errors.

On the CPU every Triton kernel runs in the interpreter, so the models here are tiny
(dim 32, two layers, sequences of a dozen tokens) and fp32; bf16 autocast and the
seed's full-size model are checked on a GPU only.
"""

import math

import pytest
import torch
from conftest import ON_GPU, assert_close_named, count_launches, cuda_only, dropout_calls

from triton_transformer.transformer import DecodeGraph, KVCache, Transformer, TransformerConfig

#: One block: the interpreter pays per kernel launch, so most tests keep the model as short as it gets.
TINY = dict(num_tokens=61, max_seq_len=32, dim=32, depth=1, heads=2, dim_head=16)
PATHS = pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])


def tiny(device, **kw) -> Transformer:
    return Transformer(**{**TINY, **kw}).to(device)


def ids(device, b=2, n=12, num_tokens=TINY["num_tokens"]):
    return torch.randint(0, num_tokens, (b, n), device=device)


def padding_mask(device, lengths, n):
    return torch.arange(n, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


def run(model, x, use_triton, **kw):
    """Loss and the gradient of every parameter for one path."""
    model.zero_grad(set_to_none=True)
    loss = model(x, labels=torch.roll(x, -1, dims=1), use_triton=use_triton, **kw)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------- the seed's usage


def test_seed_readme_snippet_scaled(device):
    """The seed README's calls. Its model verbatim on the PyTorch path; the kernels on a narrower
    copy (the interpreter would spend minutes on dim=512); the full snippet runs on a GPU below."""
    model = Transformer(num_tokens=256, max_seq_len=1024, dim=512, depth=6, heads=8, dim_head=64,
                        use_triton=True)
    x = torch.randint(0, 256, (1, 1024))
    mask = torch.ones(1, 1024).bool()
    assert model(x, mask=mask, use_triton=False).shape == (1, 1024, 256)

    model = Transformer(num_tokens=256, max_seq_len=1024, dim=32, depth=2, heads=2, dim_head=16,
                        use_triton=True).to(device)
    x = torch.randint(0, 256, (1, 16), device=device)
    mask = torch.ones(1, 16, device=device).bool()
    logits = model(x, mask=mask)
    assert logits.shape == (1, 16, 256) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, model(x, mask=mask, use_triton=False), atol=1e-4, rtol=1e-4)


@cuda_only
def test_seed_readme_snippet_full(device):
    model = Transformer(num_tokens=256, max_seq_len=1024, dim=512, depth=6, heads=8, dim_head=64,
                        use_triton=True).to(device)
    x = torch.randint(0, 256, (1, 1024), device=device)
    mask = torch.ones(1, 1024, device=device).bool()
    logits = model(x, mask=mask)
    assert logits.shape == (1, 1024, 256)
    torch.testing.assert_close(logits, model(x, mask=mask, use_triton=False), atol=1e-2, rtol=1e-2)


def test_config_round_trip():
    cfg = TransformerConfig(num_tokens=100, dim=64, depth=3, causal=True, use_triton=False)
    model = Transformer.from_config(cfg)
    assert model.config == cfg and len(model.layers) == 3 and not model.use_triton


# ---------------------------------------------------------------- both paths agree


@pytest.mark.parametrize("causal,masked", [(False, False), (True, True), (False, True)],
                         ids=["bidirectional", "causal-padded", "bidirectional-padded"])
def test_paths_agree(device, causal, masked):
    """Logits, loss and every parameter's gradient: Triton kernels against PyTorch, fp32, two blocks."""
    model = tiny(device, causal=causal, depth=2)
    x = ids(device, b=3, n=11)
    mask = padding_mask(device, [11, 7, 4], 11) if masked else None
    logits = {p: model(x, mask=mask, use_triton=p) for p in (False, True)}
    if mask is not None:  # what a padded query sees is irrelevant; compare real positions
        logits = {p: v[mask] for p, v in logits.items()}
    torch.testing.assert_close(logits[True], logits[False], atol=1e-4, rtol=1e-4)
    (loss_t, grads_t), (loss_r, grads_r) = run(model, x, True, mask=mask), run(model, x, False, mask=mask)
    torch.testing.assert_close(loss_t, loss_r, atol=1e-5, rtol=1e-5)
    assert grads_t.keys() == grads_r.keys()
    for name in grads_r:
        assert_close_named(grads_t[name], grads_r[name], name, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("n", [1, TINY["max_seq_len"]], ids=["one-token", "max_seq_len"])
def test_paths_agree_one_sequence(device, n):
    """A batch of one at the shortest and the longest sequence the model takes: loss and every gradient."""
    model = tiny(device, causal=True)
    x = ids(device, b=1, n=n)
    (loss_t, grads_t), (loss_r, grads_r) = run(model, x, True), run(model, x, False)
    torch.testing.assert_close(loss_t, loss_r, atol=1e-5, rtol=1e-5)
    for name in grads_r:
        assert_close_named(grads_t[name], grads_r[name], name, atol=1e-4, rtol=1e-3)


def test_paths_agree_fp16_autocast(device):
    """Under fp16 autocast (CPU too): our linear takes the fp32 weights and biases uncast and returns their
    gradients in fp32; loss and every gradient agree with the PyTorch path to fp16 precision."""
    model = tiny(device, causal=True)
    x = ids(device)
    with torch.autocast(device.type, dtype=torch.float16):
        (loss_t, grads_t), (loss_r, grads_r) = run(model, x, True), run(model, x, False)
    torch.testing.assert_close(loss_t.float(), loss_r.float(), atol=2e-3, rtol=2e-3)
    for name in grads_r:
        g_t, g_r = grads_t[name], grads_r[name]
        assert g_t.dtype == g_r.dtype == torch.float32, name
        assert (g_t - g_r).norm() <= 1e-2 * g_r.norm() + 1e-6, name


@cuda_only
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_paths_agree_bf16_autocast(device, causal):
    """Under bf16 autocast both paths round differently; they agree to bf16 precision."""
    model = Transformer(num_tokens=512, max_seq_len=256, dim=256, depth=2, heads=4, dim_head=64,
                        causal=causal).to(device)
    x = ids(device, b=4, n=256, num_tokens=512)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits_t = model(x, use_triton=True)
        logits_r = model(x, use_triton=False)
        assert logits_t.dtype == logits_r.dtype == torch.bfloat16
        torch.testing.assert_close(logits_t.float(), logits_r.float(), atol=3e-2, rtol=3e-2)
        (loss_t, grads_t), (loss_r, grads_r) = run(model, x, True), run(model, x, False)
    torch.testing.assert_close(loss_t.float(), loss_r.float(), atol=1e-2, rtol=1e-2)
    for name in grads_r:  # relative to the gradient's own scale: bf16 keeps ~3 significant digits
        g_t, g_r = grads_t[name].float(), grads_r[name].float()
        assert (g_t - g_r).norm() <= 0.05 * g_r.norm() + 1e-6, name


# ---------------------------------------------------------------- masks and loss


@PATHS
def test_padding_mask_batch_and_heads(device, use_triton):
    """The seed's bug: with batch > 1 and heads > 1 a padded row must equal the same row unpadded."""
    model = tiny(device, heads=4, dim_head=8)
    x = ids(device, b=3, n=10)
    lengths = [10, 6, 3]
    out = model(x, mask=padding_mask(device, lengths, 10), use_triton=use_triton)
    for row, n in enumerate(lengths):
        alone = model(x[row:row + 1, :n], use_triton=use_triton)
        torch.testing.assert_close(out[row:row + 1, :n], alone, atol=1e-4, rtol=1e-4)


@PATHS
def test_padding_is_not_in_the_loss(device, use_triton):
    model = tiny(device)
    x, y = ids(device, b=2, n=10), ids(device, b=2, n=10)
    mask = padding_mask(device, [10, 5], 10)
    loss = model(x, mask=mask, labels=y, use_triton=use_triton)
    logits = model(x, mask=mask, use_triton=use_triton)
    ref = torch.nn.functional.cross_entropy(logits[mask], y[mask])
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    # and ignore_index works as in F.cross_entropy
    y2 = y.clone()
    y2[0, :3] = -100
    ref2 = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             y2.masked_fill(~mask, -100).reshape(-1))
    torch.testing.assert_close(model(x, mask=mask, labels=y2, use_triton=use_triton), ref2, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- dropout and initialisation


@PATHS
def test_dropout_follows_training_mode(device, use_triton):
    model = tiny(device, attn_dropout=0.3, ff_dropout=0.3)
    plain = tiny(device)
    plain.load_state_dict(model.state_dict())
    x = ids(device)
    model.eval()
    torch.testing.assert_close(model(x, use_triton=use_triton), plain(x, use_triton=use_triton))
    model.train()
    a, b = model(x, use_triton=use_triton), model(x, use_triton=use_triton)
    assert not torch.allclose(a, b), "dropout should be active in training mode"
    with torch.no_grad():  # no_grad does not switch dropout off: only eval() does
        assert not torch.allclose(model(x, use_triton=use_triton), plain(x, use_triton=use_triton))


def test_feed_forward_is_one_node(device, monkeypatch):
    """The Triton path runs a feed-forward as one `feed_forward` node, with its dropout too: no elementwise
    kernel for the squared ReLU's derivative, none for the dropout (masked in the first GEMM's epilogue).
    FUSED_FEED_FORWARD off composes linear, dropout, linear; with the same seeds both draw the same masks,
    and the losses and gradients agree."""
    import triton_transformer.matmul as MM

    passes = count_launches(monkeypatch, MM._act_bwd_kernel)
    drops = dropout_calls(monkeypatch)
    x = ids(device)
    for ff_dropout in (0.0, 0.3):
        torch.manual_seed(0)
        model = tiny(device, ff_dropout=ff_dropout)
        results = {}
        for fused in (True, False):
            monkeypatch.setattr("triton_transformer.transformer.FUSED_FEED_FORWARD", fused)
            passes.clear()
            drops.clear()
            torch.manual_seed(1)  # the same drawn seeds both ways
            results[fused] = run(model, x, True)
            assert bool(passes) is not fused and bool(drops) is (not fused and ff_dropout > 0), (fused, ff_dropout)
        torch.testing.assert_close(results[True][0], results[False][0])
        for name in results[True][1]:
            torch.testing.assert_close(results[True][1][name], results[False][1][name], rtol=1e-4, atol=1e-5,
                                       msg=name)


def test_initialisation():
    torch.manual_seed(0)
    model = Transformer(num_tokens=256, max_seq_len=128, dim=256, depth=8)
    std = lambda p: p.detach().float().std().item()  # noqa: E731
    assert abs(std(model.layers[0].ff.proj_in.weight) - 0.02) < 2e-3
    assert abs(std(model.layers[0].attn.to_qkv.weight) - 0.02) < 2e-3
    residual = 0.02 / math.sqrt(2 * 8)
    for block in model.layers:
        assert abs(std(block.ff.proj_out.weight) - residual) < 1e-3
        assert abs(std(block.attn.to_out.weight) - residual) < 1e-3
        assert block.ff.proj_in.bias.abs().max() == 0
        assert block.attn.norm.bias is not None and block.ff.norm.bias is not None


def test_layer_norm_bias_is_used(device):
    model = tiny(device)
    x = ids(device)
    with torch.no_grad():
        before = model(x, use_triton=True)
        model.layers[0].ff.norm.bias.fill_(0.5)
        after = model(x, use_triton=True)
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, model(x, use_triton=False), atol=1e-4, rtol=1e-4)


def test_parameter_and_flop_count():
    model = Transformer(num_tokens=256, max_seq_len=1024, dim=512, depth=6, heads=8, dim_head=64, causal=True)
    d, f, v, L = 512, 2048, 256, 6
    per_layer = 3 * d * d + (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
    total = 2 * 0 + v * d + 1024 * d + L * per_layer + 2 * d + d * v + v
    assert model.num_params() == total
    matmul_weights = L * (3 * d * d + d * d + 2 * d * f) + d * v
    attn = 2 * 2 * 1024 * d * L / 2
    assert model.flops_per_token(1024) == 3 * (2 * matmul_weights + attn)
    assert model.flops_per_token(1024, training=False) == 2 * matmul_weights + attn


# ---------------------------------------------------------------- inference


@PATHS
def test_no_grad_saves_nothing(device, use_triton):
    """Under no_grad no op saves a tensor for backward (and the logits need no grad)."""
    model = tiny(device, causal=True, attn_dropout=0.1, ff_dropout=0.1)
    x = ids(device)
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    model.eval()
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(x, use_triton=use_triton)
        model.generate(x[:, :3], 2, use_triton=use_triton)
    assert not logits.requires_grad and saved == []
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, labels=x, use_triton=use_triton)
    assert saved, "training should save activations (the hook sees them)"


@pytest.mark.parametrize("use_triton,temperature,top_k", [
    (False, 1.0, None), (False, 0.8, 5), (False, 0.0, None), (True, 0.8, 5)],
    ids=["torch-t1", "torch-topk", "torch-greedy", "triton-topk"])
def test_generate_cached_equals_uncached(device, use_triton, temperature, top_k):
    """Same torch seed, same tokens, with and without the KV cache, and with the cache's static step
    (`DecodeGraph`: recorded as a CUDA graph on a GPU, run eagerly on the CPU)."""
    model = tiny(device, causal=True).eval()
    prompt = ids(device, b=2, n=4)
    out = {}
    for use_cache, cuda_graph in ((True, False), (False, False), (True, True)):
        torch.manual_seed(123)
        out[use_cache, cuda_graph] = model.generate(prompt, 4, temperature=temperature, top_k=top_k,
                                                    use_cache=use_cache, use_triton=use_triton, cuda_graph=cuda_graph)
    assert out[True, False].shape == (2, 8) and torch.equal(out[True, False][:, :4], prompt)
    assert torch.equal(out[True, False], out[False, False]) and torch.equal(out[True, True], out[False, False])
    assert torch.equal(model.generate(prompt, 0, use_triton=use_triton), prompt)
    dropping = tiny(device, causal=True, attn_dropout=0.1)  # in training mode: a recording would fix one mask
    with pytest.raises(ValueError, match="one dropout mask for every token"):
        dropping.generate(prompt, 2, use_triton=use_triton, cuda_graph=True)
    assert dropping.generate(prompt, 2, use_triton=use_triton).shape == (2, 6)  # the default steps eagerly


@PATHS
def test_decode_steps_over_growing_spans_match_a_full_forward(device, use_triton):
    """`DecodeGraph` attends over a power-of-two span of the cache (64, 128, then the whole 140): token by
    token its logits are those of one full forward, across every change of span (recorded on a GPU)."""
    model = tiny(device, causal=True, max_seq_len=140).eval()
    x = ids(device, b=2, n=140)
    with torch.no_grad():
        full = model(x, use_triton=use_triton)
        cache = KVCache(model.config.max_seq_len)
        model(x[:, :5], use_triton=use_triton, cache=cache)
        step = DecodeGraph(model, cache, use_triton, record=device.type == "cuda")
        for t in range(5, 140):
            torch.testing.assert_close(step(x[:, t:t + 1]), full[:, t], atol=1e-4, rtol=1e-4)
    assert cache.length == 140 and cache.span == 140
    if device.type == "cuda":  # one recording per span, each replayed after its eager first step
        assert sorted(step.graphs) == [64, 128, 140] and all(g is not None for g, _ in step.graphs.values())


def test_the_cache_past_its_length_is_zeros(device):
    """The recorded decoding step attends over the cache's whole length, masking the rows not yet written:
    those must hold finite values, since a masked key's probability 0 times a NaN is NaN (an empty buffer
    gave NaN logits under bf16 autocast on the H100)."""
    model = tiny(device, causal=True).eval()
    cache = KVCache(model.config.max_seq_len)
    with torch.no_grad():
        model(ids(device, b=2, n=4), cache=cache)
    assert all(t[:, :, 4:].eq(0).all() for t in (*cache.k.values(), *cache.v.values()))


@cuda_only
@PATHS
def test_generate_replays_a_recorded_step(device, use_triton, monkeypatch):
    """On a GPU the cached one-token step is recorded once and replayed: the model's Python runs for the
    prompt, the eager first step and the recording, not per token. Fed a sequence token by token, the replays
    give the logits of one full forward; and on the Triton path greedy decoding draws the eager step's tokens
    (the masked keys past the cache's length add exact zeros to the same sums)."""
    model = tiny(device, causal=True).eval()
    prompt = ids(device, b=3, n=5)
    calls = []
    forward = Transformer.forward
    monkeypatch.setattr(Transformer, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model.generate(prompt, 20, temperature=0.0, use_triton=use_triton, cuda_graph=False)
        assert len(calls) == 20
        graphed = model.generate(prompt, 20, temperature=0.0, use_triton=use_triton)
        assert len(calls) == 20 + 3
        if use_triton:
            assert torch.equal(graphed, eager)
        full = model(eager, use_triton=use_triton).float()
        cache = KVCache(model.config.max_seq_len)
        model(eager[:, :5], use_triton=use_triton, cache=cache)
        step = DecodeGraph(model, cache, use_triton)
        for t in range(5, eager.shape[1]):
            torch.testing.assert_close(step(eager[:, t:t + 1]), full[:, t], atol=3e-2, rtol=3e-2, msg=f"token {t}")
    assert cache.length == eager.shape[1] and [g is not None for g, _ in step.graphs.values()] == [True]


@PATHS
def test_cached_logits_equal_full_forward(device, use_triton):
    """Feeding a sequence in pieces through the cache gives the logits of one full forward."""
    model = tiny(device, causal=True).eval()
    x = ids(device, b=2, n=9)
    with torch.no_grad():
        full = model(x, use_triton=use_triton)
        cache = KVCache(model.config.max_seq_len)
        # a prompt, one token, then a chunk of three (bottom-right causal mask)
        pieces = [model(x[:, a:b], use_triton=use_triton, cache=cache) for a, b in ((0, 5), (5, 6), (6, 9))]
    assert cache.length == 9
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)


def test_generate_needs_causal_for_the_cache(device):
    model = tiny(device, use_triton=False).eval()  # bidirectional
    with pytest.raises(ValueError, match="causal"):
        model.generate(ids(device, n=3), 2, use_cache=True)
    assert model.generate(ids(device, n=3), 2).shape == (2, 5)  # recomputes the whole sequence each step


# ---------------------------------------------------------------- torch.compile


#: On the CPU, aot_eager: dynamo and AOT autograd are where a model or a custom op falls over under
#: compile; inductor's C++ code generation only costs time here (on a GPU the tests and the
#: benchmark compile with inductor).
BACKEND = "inductor" if ON_GPU else "aot_eager"


@PATHS
def test_torch_compile_matches_eager(device, use_triton):
    """torch.compile(model) gives eager's logits, loss and every gradient, on both paths (our ops are
    opaque to the compiler: it compiles the glue around them)."""
    model = tiny(device, causal=True)
    x = ids(device)
    compiled = torch.compile(model, backend=BACKEND)
    torch.testing.assert_close(compiled(x, use_triton=use_triton), model(x, use_triton=use_triton),
                               atol=1e-5, rtol=1e-5)
    loss_c, grads_c = run(compiled, x, use_triton)
    loss_e, grads_e = run(model, x, use_triton)
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
    assert [k.removeprefix("_orig_mod.") for k in grads_c] == list(grads_e)  # same parameters, same order
    for (name, g_e), g_c in zip(grads_e.items(), grads_c.values()):
        assert_close_named(g_c, g_e, name, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- bad input


@PATHS
def test_clear_errors(device, use_triton):
    model = tiny(device, use_triton=use_triton)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(ids(device, n=TINY["max_seq_len"] + 1))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 61\)"):
        model(torch.full((1, 4), 61, device=device))
    with pytest.raises(ValueError, match=r"token ids must lie"):
        model(torch.full((1, 4), -1, device=device))
    with pytest.raises(ValueError, match="mask must have the shape"):
        model(ids(device, b=2, n=8), mask=torch.ones(2, 7, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match="mask must be a bool"):
        model(ids(device, b=2, n=8), mask=torch.ones(2, 8, device=device))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.rand(2, 8, device=device))
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        model(ids(device, b=2, n=8)[0])
    with pytest.raises(ValueError, match="labels must have the shape"):
        model(ids(device, b=2, n=8), labels=ids(device, b=2, n=7))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.generate(ids(device, n=30), 3, use_cache=False)
    cache = KVCache(32)
    model(ids(device, n=4), cache=cache)  # a bidirectional model may fill a cache once...
    with pytest.raises(ValueError, match="needs causal=True"):
        model(ids(device, n=1), cache=cache)  # ...but not extend it: old positions would see new tokens
    causal = tiny(device, causal=True, use_triton=use_triton)
    cache = KVCache(32)
    causal(ids(device, n=30), cache=cache)
    with pytest.raises(ValueError, match="length 33 is longer than max_seq_len=32"):
        causal(ids(device, n=3), cache=cache)  # the cache's positions count towards max_seq_len
    with pytest.raises(ValueError, match="x is on meta but the model is on"):
        model(torch.empty(2, 4, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="labels is on meta but the model is on"):
        model(ids(device, n=4), labels=torch.empty(2, 4, dtype=torch.long, device="meta"))


def test_an_empty_batch_gives_empty_logits(device):
    model = tiny(device)
    for use_triton in (False, True):
        logits = model(torch.zeros(2, 0, dtype=torch.long, device=device), use_triton=use_triton)
        assert logits.shape == (2, 0, TINY["num_tokens"])
