"""Routing semantics (spec: model-and-routing.md, "Routing (hybrid-k), exactly") against a plain
per-token reference written here, and the router module against megatron-core's own router in eval."""
import pytest
import torch

from megatron_medmoe.model.routing import routing_weights, select_experts

E, K = 7, 2


def reference(probs, k, mode, training, family):
    """The spec's steps, one token at a time, with Python lists."""
    out = torch.zeros_like(probs)
    for t in range(probs.shape[0]):
        p = probs[t].tolist()
        fam = int(family[t]) if family is not None else None
        if mode == "hard":
            out[t, fam] = 1.0
            continue
        chosen = sorted(range(len(p)), key=lambda i: -p[i])[:k]
        if mode == "hybrid" and training and fam not in chosen:
            weaker = min(chosen, key=lambda i: p[i])
            chosen[chosen.index(weaker)] = fam
        for i in chosen:
            out[t, i] = p[i]  # original probability, not renormalised
    return out


def routed(probs, k, mode, training, family):
    selected, _ = select_experts(probs, k, mode, training, family)
    weights, routing_map = routing_weights(probs, selected, mode)
    assert torch.equal(routing_map, weights > 0)
    return weights


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(400, E, generator=g) * 2, dim=-1)
    family = torch.randint(0, E, (400,), generator=g)
    return probs, family


@pytest.mark.parametrize("mode, training", [("hybrid", True), ("hybrid", False), ("topk", True),
                                            ("topk", False), ("hard", True), ("hard", False)])
def test_matches_the_reference(batch, mode, training):
    probs, family = batch
    k = 1 if mode == "hard" else K
    assert torch.equal(routed(probs, k, mode, training, family), reference(probs, k, mode, training, family))


def test_forced_family_replaces_the_weaker_pick(batch):
    probs, family = batch
    selected, held = select_experts(probs, K, "hybrid", True, family)
    top = torch.topk(probs, K).indices
    forced = ~held
    assert forced.any() and held.any()
    assert torch.equal(selected[held], top[held])
    assert torch.equal(selected[forced, 0], top[forced, 0])  # the stronger pick stays
    assert torch.equal(selected[forced, 1], family[forced])  # the weaker one gives way to the family
    assert ((selected == family[:, None]).any(-1)).all()


def test_weights_are_original_probabilities_not_renormalised(batch):
    probs, family = batch
    weights = routed(probs, K, "hybrid", True, family)
    assert (weights.sum(-1) < 1 - 1e-3).all()  # 2 of 7 experts never sum to one
    mask = weights > 0
    assert torch.equal(weights[mask], probs[mask])


def test_eval_is_plain_topk_and_ignores_family(batch):
    probs, family = batch
    a = routed(probs, K, "hybrid", False, family)
    b = routed(probs, K, "hybrid", False, torch.zeros_like(family))
    c = routed(probs, K, "hybrid", False, None)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(a, routed(probs, K, "topk", True, family))


def test_hard_routing_uses_family_only_with_weight_one(batch):
    probs, family = batch
    weights = routed(probs, 1, "hard", True, family)
    assert torch.equal(weights.argmax(-1), family) and torch.equal(weights.sum(-1), torch.ones(400))


def test_ids_are_required_where_they_are_used(batch):
    probs, _ = batch
    with pytest.raises(ValueError, match="hybrid routing in training needs"):
        select_experts(probs, K, "hybrid", True, None)
    with pytest.raises(ValueError, match="hard routing needs"):
        select_experts(probs, 1, "hard", False, None)


# ---- the router module, on megatron-core (one process) ----

def _config(slots=E, aux=0.0, z=None):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=2, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2,
                             use_cpu_initialization=True, num_moe_experts=slots, moe_ffn_hidden_size=32,
                             moe_router_topk=K, add_bias_linear=False, moe_router_pre_softmax=True,
                             moe_router_dtype="fp32", moe_router_load_balancing_type="aux_loss" if aux else "none",
                             moe_aux_loss_coeff=aux, moe_z_loss_coeff=z)


def _router(routing="hybrid", slots=E, placement=None, aux=0.0, z=None):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_medmoe.model.router import FamilyRouter

    router = FamilyRouter(_config(slots, aux, z), ProcessGroupCollection.use_mpu_process_groups(), routing=routing,
                          slot_of_expert=placement or list(range(E)))
    router.set_layer_number(1)
    return router


def test_router_softmax_over_all_experts_in_float32(megatron_single_rank):
    router = _router()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 16, generator=g)
    family = torch.randint(0, E, (6, 3), generator=g)
    probs = torch.softmax((x.reshape(-1, 16).double() @ router.weight.double().t()), -1).float()
    for training in (True, False):
        router.train(training)
        weights, routing_map = router(x, family)
        expected = reference(probs, K, "hybrid", training, family.reshape(-1))
        torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-7)
        assert torch.equal(routing_map, expected > 0)


def test_router_eval_equals_megatron_pre_softmax_router(megatron_single_rank):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.router import TopKRouter

    ours = _router().eval()
    theirs = TopKRouter(_config(), ProcessGroupCollection.use_mpu_process_groups()).eval()
    theirs.weight.data.copy_(ours.weight.data)
    x = torch.randn(5, 2, 16)
    a, b = ours(x), theirs(x)
    torch.testing.assert_close(a[0], b[0])
    assert torch.equal(a[1], b[1])


def test_router_places_experts_in_slots(megatron_single_rank):
    placement = [7, 0, 1, 2, 3, 4, 5]  # expert 0 in the last slot, slot 6 is padding
    router = _router(slots=8, placement=placement).train()
    plain = _router().train()
    plain.weight.data.copy_(router.weight.data)
    x = torch.randn(4, 2, 16)
    family = torch.randint(0, E, (4, 2))
    slotted, slotted_map = router(x, family)
    per_expert, per_expert_map = plain(x, family)
    assert slotted.shape == (8, 8)
    torch.testing.assert_close(slotted[:, placement], per_expert)
    assert torch.equal(slotted_map[:, placement], per_expert_map)
    assert not slotted_map[:, 6].any()  # padding is never routed to


def test_router_gradient_only_when_weights_depend_on_it(megatron_single_rank):
    hybrid = _router("hybrid").train()
    weights, _ = hybrid(torch.randn(3, 2, 16), torch.randint(0, E, (3, 2)))
    weights.sum().backward()
    assert hybrid.weight.grad.abs().sum() > 0
    hard = _router("hard").train()
    hard.topk = 1
    weights, _ = hard(torch.randn(3, 2, 16), torch.randint(0, E, (3, 2)))
    assert not weights.requires_grad  # weight 1 on the family expert: the router learns nothing


def test_router_rejects_misaligned_ids(megatron_single_rank):
    router = _router().train()
    with pytest.raises(ValueError, match="must be split like the hidden states"):
        router(torch.randn(4, 2, 16), torch.zeros(8, 2, dtype=torch.long))


@pytest.mark.parametrize("aux, z", [(1.0, None), (0.0, 0.5), (1.0, 0.5)])  # large: float32 differences
def test_aux_and_z_loss_add_exactly_their_gradient(megatron_single_rank, aux, z):
    """Off by default; when on, the router's gradient gains exactly that of the switch balance loss over the
    dispatched tokens (E * sum_i f_i P_i, scaled by the coefficient) and of the z-loss."""
    plain, regularised = _router().train(), _router(aux=aux, z=z).train()
    regularised.weight.data.copy_(plain.weight.data)
    x = torch.randn(8, 2, 16)
    family = torch.randint(0, E, (8, 2))
    for router in (plain, regularised):
        router(x, family)[0].sum().backward()
    w = plain.weight.detach().clone().requires_grad_(True)
    logits = x.reshape(-1, 16) @ w.t()
    probs = torch.softmax(logits, -1)
    routing_map = routed(probs.detach(), K, "hybrid", True, family.reshape(-1)) > 0
    tokens = routing_map.shape[0]
    extra = torch.zeros(())
    if aux:
        f = routing_map.sum(0).float() / (tokens * K)
        extra = extra + aux * E * (f * probs.mean(0)).sum()
    if z:
        extra = extra + z * torch.logsumexp(logits, -1).square().mean()
    extra.backward()
    torch.testing.assert_close(regularised.weight.grad - plain.weight.grad, w.grad, rtol=1e-4, atol=1e-6)
    assert w.grad.abs().max() > 1e-3


def test_the_dispatcher_may_pad_the_routing_map_in_place(megatron_single_rank):
    """FP8 token padding (moe_router_padding_for_quantization): megatron-core's alltoall dispatcher pads the
    routing map in place (pad_routing_map); autograd must not have kept that very tensor (slots == experts)."""
    from megatron.core.transformer.moe.moe_utils import pad_routing_map

    router = _router().train()
    weights, routing_map = router(torch.randn(16, 4, 16), torch.randint(0, E, (16, 4)))
    pad_routing_map(routing_map, 16)  # what token_dispatcher.py does before permuting
    weights.sum().backward()
    assert router.weight.grad.abs().sum() > 0
