"""Locking changes nothing the tower computes, and a locked tower never moves."""

import torch

from littune.train.losses import ContrastiveLoss


def _opt(model):
    groups = [g for g in model.param_groups(weight_decay=0.1) if not g["frozen"]]
    return torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups], lr=1e-2)


def test_lu_image_tower_never_changes_text_tower_does(tiny_model):
    model = tiny_model("Lu")
    tower = model.image_tower
    before = {k: v.clone() for k, v in tower.state_dict().items()}  # parameters and BatchNorm buffers
    text_before = {k: v.clone() for k, v in model.text_tower.state_dict().items()}
    opt, loss_fn = _opt(model), ContrastiveLoss()
    model.train()
    assert not tower.training, "a locked tower stays in eval mode"
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        pixels = torch.randn(6, 3, 32, 32, generator=g)
        toks = model.tokenize([f"caption number {step} {i}" for i in range(6)])
        img, txt = model(**toks, pixels=pixels)
        loss = loss_fn(img, txt, model.logit_scale)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in tower.parameters()), "the locked tower receives no gradient"
        opt.step()
    after = tower.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"{k} changed"
    assert any("running_mean" in k for k in before)
    changed = [k for k, v in model.text_tower.state_dict().items() if not torch.equal(v, text_before[k])]
    assert len(changed) > 0


def test_locked_embeddings_equal_the_pretrained_models_own_eval_output(tiny_model):
    from littune.towers.tiny import tiny_cnn

    model = tiny_model("Lu").train()
    reference = tiny_cnn().eval()  # the "pre-trained" model, as its author would run it
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = reference(x).mean(dim=(2, 3))
    assert torch.equal(model.image_features(x), want)


def test_unlocked_tower_trains_and_lr_multipliers(tiny_model):
    model = tiny_model("Uu")
    groups = {g["name"]: g for g in model.param_groups({"image": 0.1})}
    assert groups["image"]["lr_mult"] == 0.1 and not groups["image"]["frozen"]
    model.train()
    assert model.image_tower.training
    before = [p.clone() for p in model.image_tower.parameters()]
    opt, loss_fn = _opt(model), ContrastiveLoss()
    toks = model.tokenize(["a", "b", "c", "d"])
    img, txt = model(**toks, pixels=torch.randn(4, 3, 32, 32))
    loss_fn(img, txt, model.logit_scale).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.image_tower.parameters()))


def test_ll_trains_only_heads(tiny_model):
    model = tiny_model("LL")
    names = {g["name"]: g["frozen"] for g in model.param_groups()}
    assert names["image"] and names["text"] and not names["head"]
    assert not any(p.requires_grad for p in model.text_tower.parameters())


def test_random_init_differs_from_pretrained(tiny_model):
    a, b = tiny_model("Lu"), tiny_model("uu")
    wa = dict(a.image_tower.named_parameters())
    assert any(not torch.equal(p, wa[n]) for n, p in b.image_tower.named_parameters())
