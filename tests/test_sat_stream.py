"""SAT's fused inference step (``SAT.stream_features``, the K/V memo, the packed-weight kernel) against the block
modules (``SAT.reference_features``, the implementation before it) on real ESC-10 audio with the fixture SAT-T."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tympan
from tympan import audio
from tympan.models import sat as sat_module
from tympan.ops import small_gemm

ATOL = 1e-5


@pytest.fixture(scope="module")
def sat(shared_dir):
    return tympan.load("sat-tiny-2s", checkpoint=shared_dir / "fixtures" / "sat-tiny-2s" / "checkpoint.pt")


@pytest.fixture(scope="module")
def chunks(data_dir, sat) -> list[torch.Tensor]:
    """Six consecutive full chunks from three ESC-10 clips end to end (11.5 s)."""
    files = sorted((data_dir / "esc10" / "audio").glob("*.flac"))
    wave = torch.cat([torch.from_numpy(audio.load(files[i])) for i in (0, 100, 200)])
    step = sat.chunk_samples
    return [wave[None, i * step:(i + 1) * step] for i in range(6)]


def _stream(model, chunks, fast: bool, monkeypatch, state=None):
    """Logits and states of each step carrying the state, through the fused (``fast``) or the reference path."""
    monkeypatch.setattr(sat_module, "FAST_STEP", fast)
    outputs = []
    with torch.inference_mode():
        state = model.init_state(chunks[0].shape[0]) if state is None else state
        for chunk in chunks:
            logits, state = model.step(chunk, state)
            outputs.append((logits, state[0]))
    return outputs


def _step_key(sat) -> tuple[int, ...] | None:
    """The K/V memo key a step uses: the kernel's block table's fingerprint where the kernel runs."""
    with torch.inference_mode():
        return sat._memo_key(small_gemm.block_table(sat.blocks, torch.zeros(1, 1, sat.embed_dim)))


def _assert_close(got, expected):
    for (logits, state), (ref_logits, ref_state) in zip(got, expected, strict=True):
        torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(state, ref_state, atol=ATOL, rtol=1e-5)


def test_fused_steps_equal_reference_over_a_stream(sat, chunks, monkeypatch):
    """Six steps carrying the state (the K/V memo is used from the second on) match the block modules."""
    fused = _stream(sat, chunks, True, monkeypatch)
    assert sat._kv_memo.lookup(fused[-1][1], _step_key(sat)) is not None  # the next step would reuse its K/V
    _assert_close(fused, _stream(sat, chunks, False, monkeypatch))


def test_threads_sharing_one_model_keep_their_own_memo(sat, chunks, monkeypatch):
    """Two threads stream different audio through one model at once (a server's request threads): each thread's
    steps equal the same stream run alone, and after both have stepped each still finds its own keys/values in the
    memo (per thread: another thread's step neither evicts them nor is paired with them)."""
    import threading

    streams = {"a": chunks, "b": chunks[::-1]}
    alone = {name: _stream(sat, c, True, monkeypatch) for name, c in streams.items()}
    results: dict[str, list] = {}
    hits: dict[str, list[bool]] = {name: [] for name in streams}
    barrier = threading.Barrier(2, timeout=120)  # a failing thread breaks it instead of hanging the other

    def run(name: str) -> None:
        with torch.inference_mode():
            state, out = sat.init_state(1), []
            for _ in range(2):  # the same stream twice over, in lockstep with the other thread's steps
                for chunk in streams[name]:
                    logits, state = sat.step(chunk, state)
                    out.append((logits, state[0]))
                    barrier.wait()  # both threads have stored their step's keys/values
                    hits[name].append(sat._kv_memo.lookup(state[0], _step_key(sat)) is not None)
                    barrier.wait()
                state = sat.init_state(1)
        results[name] = out

    threads = [threading.Thread(target=run, args=(name,)) for name in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in streams:
        _assert_close(results[name], alone[name] * 2)
        assert all(hits[name]), hits


def test_short_chunk_cold_state_and_batch(sat, chunks, monkeypatch):
    short = [chunks[0], chunks[1][:, :5000], chunks[2]]  # a short chunk keeps part of the re-positioned memory
    _assert_close(_stream(sat, short, True, monkeypatch), _stream(sat, short, False, monkeypatch))
    cold = sat.init_state(1, warm=False)
    _assert_close(_stream(sat, chunks[:2], True, monkeypatch, cold), _stream(sat, chunks[:2], False, monkeypatch, cold))
    pair = [torch.cat([a, 0.1 * b]) for a, b in zip(chunks[:3], chunks[3:])]
    _assert_close(_stream(sat, pair, True, monkeypatch), _stream(sat, pair, False, monkeypatch))


def test_memo_misses_for_other_or_edited_states(sat, chunks, monkeypatch):
    """The memo serves a state equal to the one the last step returned; another stream's state, an edited one or
    changed weights recompute the memory keys/values."""
    monkeypatch.setattr(sat_module, "FAST_STEP", False)
    with torch.inference_mode():
        _, state_a = sat.step(chunks[0], sat.init_state(1))
        _, state_b = sat.step(chunks[1], sat.init_state(1))
        expected_a = sat.step(chunks[2], state_a)[0]
        edited = state_b[0].clone()
        edited[3] *= 0.5
        expected_edited = sat.step(chunks[2], (edited,))[0]
    monkeypatch.setattr(sat_module, "FAST_STEP", True)
    with torch.inference_mode():
        _, new_b = sat.step(chunks[1], sat.init_state(1))  # memo now holds stream b's memory
        torch.testing.assert_close(sat.step(chunks[2], state_a)[0], expected_a, atol=ATOL, rtol=1e-5)
        sat.step(chunks[1], sat.init_state(1))
        new_b[0][3] *= 0.5  # the returned state edited in place: equals ``edited``, not the memo's copy
        torch.testing.assert_close(sat.step(chunks[2], new_b)[0], expected_edited, atol=ATOL, rtol=1e-5)


def test_memo_misses_after_a_weight_change(chunks, shared_dir, monkeypatch):
    model = tympan.load("sat-tiny-2s", checkpoint=shared_dir / "fixtures" / "sat-tiny-2s" / "checkpoint.pt")
    with torch.inference_mode():
        _, state = model.step(chunks[0], model.init_state(1))
    with torch.no_grad():
        model.blocks[5].attn.qkv.weight.mul_(1.5)
        model.blocks[7].norm1.bias.add_(0.1)
    fused = _stream(model, chunks[1:3], True, monkeypatch, state)
    _assert_close(fused, _stream(model, chunks[1:3], False, monkeypatch, state))


def test_training_and_grad_take_the_reference_path(sat, chunks):
    """With autograd on, the step runs the block modules, so gradients reach the memory's key/value weights."""
    model = sat
    spec = model.per_clip_spec(chunks[0])
    with torch.enable_grad():
        tokens, _ = model.forward_features(spec, model.init_state(1)[0])
        tokens.sum().backward()
    grad = model.blocks[3].attn.qkv.weight.grad
    assert grad is not None and grad[192:].abs().sum() > 0
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("rows,k,n,bias", [(48, 192, 576, True), (49, 192, 192, True), (5, 768, 192, False),
                                           (96, 64, 32, True)])
def test_small_gemm_matches_linear(rows, k, n, bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(k, n, bias=bias)
    x = torch.randn(2, rows, k)
    with torch.inference_mode():
        torch.testing.assert_close(small_gemm.linear(layer, x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        for width in (33, 521):  # N not a multiple of 32: zero-padded panels, the extra columns dropped
            odd = torch.nn.Linear(k, width, bias=bias)
            out = small_gemm.linear(odd, x)
            assert out.shape == (2, rows, width) and out.is_contiguous()
            torch.testing.assert_close(out, odd(x), atol=1e-5, rtol=1e-5)
            if small_gemm.available():  # rows independent of each other: the same bits alone or in a batch
                assert torch.equal(small_gemm.linear(odd, x[1, 3:4]), out[1, 3:4])
        made_here = torch.nn.Linear(k, n, bias=bias)  # inference-tensor weights: packed afresh, never cached
        made_here.load_state_dict(layer.state_dict())
        torch.testing.assert_close(small_gemm.linear(made_here, x), small_gemm.linear(layer, x), atol=0, rtol=0)
    with torch.no_grad():
        layer.weight.mul_(2)  # the packed copy follows the weight's version (and the padded bias the bias's)
        if bias:
            layer.bias.add_(1)
    with torch.inference_mode():
        torch.testing.assert_close(small_gemm.linear(layer, x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def _reference_blocks(blocks, x, memories, kv_given):
    """Block modules one by one (memory attention as SAT's reference step), returning the outputs and the chunk's
    keys/values; ``kv_given[i]`` replaces block i's memory keys/values."""
    outputs, kvs = [x], []
    for block, memory, given in zip(blocks, memories, kv_given):
        d = x.shape[-1]
        w, b = block.attn.qkv.weight, block.attn.qkv.bias
        kvs.append(F.linear(block.norm1(x), w[d:], b[d:]))
        if given is None:
            x = block(x, memory=memory)
        else:  # the same attention with the given memory keys/values
            attn, heads = block.attn, block.attn.num_heads
            h = block.norm1(x)
            q = F.linear(h, w[:d], b[:d]).unflatten(-1, (heads, -1)).transpose(1, 2)
            k, v = torch.cat([given, kvs[-1]], 1).unflatten(-1, (2, heads, -1)).permute(2, 0, 3, 1, 4)
            mixed = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            x = x + attn.proj(mixed)
            x = x + block.mlp(block.norm2(x))
        outputs.append(x)
    return torch.stack(outputs), torch.stack(kvs)


needs_kernel = pytest.mark.skipif(not small_gemm.available(), reason="no C compiler or no AVX-512")


def _kernel_blocks(blocks, x, memories, kv_given, threads):
    """The blocks through the C kernel (:func:`small_gemm.run_blocks`) on ``threads`` threads: (block outputs with
    the input as plane 0, the chunk's keys/values, the memory's keys/values)."""
    depth, (batch, n, d), m = len(blocks), x.shape, 0 if memories is None else memories[0].shape[1]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            table = small_gemm.block_table(blocks, x)
            assert table is not None
            states = torch.empty(depth + 1, batch, n, d)
            states[0] = x
            kvc, kvm = torch.empty(depth, batch, n, 2 * d), torch.empty(depth, batch, m, 2 * d)
            small_gemm.run_blocks(table, states, memories, kv_given, kvm, kvc)
    finally:
        torch.set_num_threads(previous)
    return states, kvc, kvm


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch,n,m,given", [(1, 48, 48, False), (2, 44, 48, True), (1, 4, 0, False), (3, 13, 20, True)])
def test_run_blocks_matches_block_modules(threads, batch, n, m, given):
    """The one-call C blocks (split over 1 or 2 threads by output panels and by (stream, head, query tile)
    attention units, streams straddling the split) equal the modules."""
    from tympan.models.layers import Block

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(Block(96, 3) for _ in range(3)).eval()
    with torch.no_grad():
        for p in blocks.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(batch, n, 96)
    memories = [torch.randn(batch, m, 96) for _ in blocks] if m else [None] * 3
    kv_given = [None, torch.randn(batch, m, 192), None] if given else [None] * 3
    with torch.inference_mode():
        expected, expected_kv = _reference_blocks(blocks, x, memories, kv_given)
    states, kvc, kvm = _kernel_blocks(blocks, x, memories if m else None, kv_given, threads)
    torch.testing.assert_close(states, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kvc, expected_kv, atol=1e-5, rtol=1e-5)
    if m:
        for i, memory in enumerate(memories):
            if kv_given[i] is None:  # computed here: norm1 and the key/value rows of qkv
                w, b = blocks[i].attn.qkv.weight, blocks[i].attn.qkv.bias
                torch.testing.assert_close(kvm[i], F.linear(blocks[i].norm1(memory), w[96:], b[96:]), atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("batch,n,m", [(1, 48, 48), (3, 13, 20)])
def test_run_blocks_do_not_depend_on_the_thread_count(batch, n, m):
    """Every output is computed by one thread with the same arithmetic whatever the split: 1, 2 and 3 threads give
    the same bits (a stream's logits do not depend on the machine's core count)."""
    from tympan.models.layers import Block

    torch.manual_seed(1)
    blocks = torch.nn.ModuleList(Block(96, 3) for _ in range(2)).eval()
    x = torch.randn(batch, n, 96)
    memories = [torch.randn(batch, m, 96) for _ in blocks]
    results = [_kernel_blocks(blocks, x, memories, [None, None], threads) for threads in (1, 2, 3)]
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@needs_kernel
def test_kernel_gelu_and_table_fallbacks():
    """The kernel's exact GELU is within 2e-6 of torch's; blocks it cannot run (tanh GELU, head size not a multiple
    of 32, autograd) get no table."""
    from tympan.models.layers import Block

    x = torch.linspace(-12, 12, 1 << 16)
    torch.testing.assert_close(small_gemm.gelu(x), F.gelu(x), atol=2e-6, rtol=0)
    blocks = torch.nn.ModuleList([Block(96, 3)]).eval()
    tokens = torch.zeros(1, 8, 96)
    with torch.inference_mode():
        assert small_gemm.block_table(blocks, tokens) is not None
        assert small_gemm.block_table(torch.nn.ModuleList([Block(96, 2)]).eval(), tokens) is None  # head size 48
        blocks[0].mlp.act = torch.nn.GELU(approximate="tanh")
        assert small_gemm.block_table(blocks, tokens) is None
    assert small_gemm.block_table(torch.nn.ModuleList([Block(96, 3)]), tokens) is None  # autograd on


def test_fingerprint_follows_changes_and_refuses_inference_tensors():
    """The weights key every cache here checks: an in-place change or a replaced storage moves it; an inference
    tensor (no version counter) gives None, so nothing is cached from it."""
    from tympan.ops.weights import fingerprint

    layer = torch.nn.Linear(4, 4)
    key = fingerprint([layer.weight, layer.bias])
    assert key is not None and fingerprint([layer.weight, layer.bias]) == key
    with torch.no_grad():
        layer.bias.add_(1.0)
    assert fingerprint([layer.weight, layer.bias]) != key
    key = fingerprint([layer.weight, layer.bias])
    layer.weight.data = torch.zeros(4, 4)
    assert fingerprint([layer.weight, layer.bias]) != key
    with torch.inference_mode():
        frozen = torch.ones(3)
    assert fingerprint([layer.weight, frozen]) is None
