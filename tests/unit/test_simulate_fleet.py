from spendstream.contracts import TOKEN_PARENTS
from spendstream.simulate import MODEL_MIX, Fleet


def test_fleet_is_deterministic_and_valid():
    fa, fb = Fleet(seed=3), Fleet(seed=3)
    a = [fa.event() for _ in range(200)]
    b = [fb.event() for _ in range(200)]
    assert [e["event_id"] for e in a] == [e["event_id"] for e in b]
    assert len({e["event_id"] for e in a}) == 200
    for ev in a:
        for sub, parent in TOKEN_PARENTS.items():
            assert ev.get(sub, 0) <= ev.get(parent, 0)
        assert (ev["provider"], ev["model"]) in {(p, m) for p, m, _, _ in MODEL_MIX}


def test_runaway_agent_dominates():
    f = Fleet(agents=10, runaway=True, seed=1)
    agents = [f.event()["agent"] for _ in range(2000)]
    assert agents.count("runaway-agent") > 900


def test_model_mix_is_priced_by_the_catalog():
    from genai_prices import Usage, calc_price

    for provider, model, _, _ in MODEL_MIX:
        assert (
            calc_price(Usage(input_tokens=1000, output_tokens=10), model_ref=model, provider_id=provider).total_price
            > 0
        )
