"""The contrastive losses, in one process and global across 2 gloo processes; full and chunked."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from littune.train.losses import ContrastiveLoss


def _pairs(n=8, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    b = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return a, b


def test_softmax_matches_hand_computation():
    a, b = _pairs()
    scale = torch.tensor(math.log(10.0))
    logits = 10.0 * a @ b.t()
    n = a.shape[0]
    want = 0.0
    for i in range(n):
        want += -torch.log_softmax(logits[i], 0)[i] - torch.log_softmax(logits[:, i], 0)[i]
    want = want / (2 * n)
    got = ContrastiveLoss("softmax")(a, b, scale)
    assert torch.allclose(got, want, atol=1e-6)


def test_sigmoid_matches_hand_computation():
    a, b = _pairs()
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    logits = 10.0 * a @ b.t() - 10.0
    z = 2 * torch.eye(a.shape[0]) - 1
    want = -F.logsigmoid(z * logits).sum() / a.shape[0]
    assert torch.allclose(ContrastiveLoss("sigmoid")(a, b, scale, bias), want, atol=1e-6)
    with pytest.raises(ValueError):
        ContrastiveLoss("sigmoid")(a, b, scale)
    with pytest.raises(ValueError):
        ContrastiveLoss("hinge")


def test_loss_is_lower_for_matching_pairs():
    a, _ = _pairs()
    rnd = _pairs(seed=1)[1]
    loss = ContrastiveLoss("softmax")
    assert loss(a, a, torch.tensor(math.log(10.0))) < loss(a, rnd, torch.tensor(math.log(10.0)))


def _loss_and_grads(kind, chunk, n=37, d=8, seed=0):
    a, b = _pairs(n, d, seed)
    a, b = a.requires_grad_(), b.requires_grad_()
    scale = torch.tensor(math.log(12.0), requires_grad=True)
    bias = torch.tensor(-4.0, requires_grad=True)
    loss = ContrastiveLoss(kind, chunk=chunk)(a, b, scale, bias if kind == "sigmoid" else None)
    loss.backward()
    return [loss.detach(), a.grad, b.grad, scale.grad] + ([bias.grad] if kind == "sigmoid" else [])


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("chunk", [1, 5, 36])
def test_chunked_loss_equals_full_loss_and_gradients(kind, chunk):
    """Rows in chunks (one row, a chunk that does not divide the batch, all but one row): the same loss
    and the same gradients for both embeddings, the temperature and the sigmoid bias."""
    full, chunked = _loss_and_grads(kind, 0), _loss_and_grads(kind, chunk)
    for name, f, c in zip(["loss", "image", "text", "scale", "bias"], full, chunked):
        assert f.abs().sum() > 0, name  # every gradient is there to compare
        assert torch.allclose(f, c, rtol=1e-5, atol=1e-6), (name, f, c)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_chunked_loss_never_keeps_a_batch_by_batch_matrix(kind):
    """What autograd keeps for the backward pass is O(N x d), not the N x N logits (the full loss keeps them)."""
    def largest_saved(chunk):
        sizes = []
        a, b = _pairs(256, 4)
        a, b = a.requires_grad_(), b.requires_grad_()
        scale, bias = torch.tensor(2.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            ContrastiveLoss(kind, chunk=chunk)(a, b, scale, bias).backward()
        return max(sizes)

    assert largest_saved(0) >= 256 * 256
    assert largest_saved(16) <= 256 * 4


def test_chunk_must_not_be_negative():
    with pytest.raises(ValueError, match="chunk"):
        ContrastiveLoss("softmax", chunk=-1)


# -- global loss over 2 processes ----------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_and_data(seed=0):
    torch.manual_seed(seed)
    img_proj, txt_proj = torch.nn.Linear(6, 4), torch.nn.Linear(7, 4)
    x, y = torch.randn(8, 6), torch.randn(8, 7)
    scale, bias = torch.nn.Parameter(torch.tensor(2.0)), torch.nn.Parameter(torch.tensor(-3.0))
    return img_proj, txt_proj, scale, bias, x, y


def _grads(kind, img_proj, txt_proj, scale, bias, x, y, chunk=0):
    loss = ContrastiveLoss(kind, chunk=chunk)(F.normalize(img_proj(x), dim=-1), F.normalize(txt_proj(y), dim=-1), scale, bias)
    params = [*img_proj.parameters(), *txt_proj.parameters(), scale, bias]
    loss.backward()
    return loss.detach(), [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def _worker(rank, world, port, kind, chunk, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    img_proj, txt_proj, scale, bias, x, y = _model_and_data()
    n = x.shape[0] // world
    part = slice(rank * n, (rank + 1) * n)
    loss, grads = _grads(kind, img_proj, txt_proj, scale, bias, x[part], y[part], chunk=chunk)
    # What DDP does: average gradients (and we average the loss for reporting).
    dist.all_reduce(loss)
    for g in grads:
        dist.all_reduce(g)
    if rank == 0:
        out.put(((loss / world).tolist(), [(g / world).tolist() for g in grads]))
        out.close()
        out.join_thread()  # the result is delivered before this process goes away
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter teardown: gloo's threads can abort a process at exit ("terminate called
    # without an active exception") after the work is done, which would fail the test for no reason.
    os._exit(0)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("chunk", [0, 3])
def test_global_loss_two_processes_equals_one_process(kind, chunk):
    """Full (chunk 0) and chunked (3 of each rank's 4 rows at a time) over 2 ranks == the full loss in 1."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, kind, chunk, q)) for r in range(2)]
    for p in procs:
        p.start()
    loss2, grads2 = q.get(timeout=120)
    loss2, grads2 = torch.tensor(loss2), [torch.tensor(g) for g in grads2]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    loss1, grads1 = _grads(kind, *_model_and_data())
    assert torch.allclose(loss1, loss2, atol=1e-6), (loss1, loss2)
    for g1, g2 in zip(grads1, grads2):
        assert torch.allclose(g1, g2, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads1)
