"""The cross-request suffix cache: matches against a brute-force search, frequency-based
probabilities, FIFO eviction within a fixed memory bound, the drafter / generator / bench
plumbing, greedy identity and the exact sampling distribution with cache drafts."""

from __future__ import annotations

import random
import threading
from collections import Counter

import numpy as np
import pytest
from conftest import layered_pair, loaded, make_model, make_tokenizer, perturbed
from test_ngram import chi_square_p, exact_distribution, pooled, run

from adaspec.api import SpeculativeGenerator
from adaspec.bench.methods import MethodError, parse_methods
from adaspec.drafters.ngram import NgramDrafter
from adaspec.drafters.suffix import SuffixCache, make_cache
from adaspec.errors import InvalidArgumentError
from adaspec.frontend.options import suffix_cache_arg
from adaspec.sampling import SamplingConfig

# ---------------------------------------------------------------------------- the index


def test_match_copies_the_continuation_and_measures_the_length():
    cache = SuffixCache(4096, min_path_prob=0.0)
    text = list(range(100, 160))
    cache.add(text)
    m = cache.match([7, 8] + text[:30], 8)
    assert m.origin == "cache" and m.tokens == tuple(text[30:38])
    assert m.length == 30 and m.count == 1 and m.agreement == 0.5 and m.probs == (0.5,) * 8  # seen once
    assert cache.match([7, 8] + text[:30], 100).tokens == tuple(text[30:])  # stops at the text's end
    cache.add(text)
    assert cache.match([7, 8] + text[:30], 8).probs == (2 / 3,) * 8  # seen twice
    floor = SuffixCache(4096)  # min_path_prob 0.05: 0.5 ** 4 passes, 0.5 ** 5 does not
    floor.add(text)
    assert floor.match(text[:30], 8).tokens == tuple(text[30:34])
    assert cache.match([1, 2, 3, 4], 8).tokens == ()  # never seen
    assert cache.match(text[:2], 8).tokens == ()  # shorter than the shortest order (3)


def test_a_match_never_runs_across_two_texts():
    cache = SuffixCache(4096)
    cache.add([1, 2, 3, 4, 5])
    cache.add([6, 7, 8, 9])
    assert cache.match([9, 3, 4, 5], 8).tokens == ()  # 3 4 5 ends its text: no follower
    m = cache.match([0, 2, 3, 4], 8)
    assert m.tokens == (5,) and m.length == 3  # extends back to 2, not into the sentinel


def test_probabilities_come_from_continuation_counts():
    cache = SuffixCache(4096, min_path_prob=0.0, follow_best=False)
    for follower in (10, 10, 10, 11):
        cache.add([1, 2, 3, follower, 20, 21])
    m = cache.match([0, 1, 2, 3], 3)
    assert m.count == 4 and m.agreement == pytest.approx(1 / 5)  # the most recent: 11, 1 of 4 (+1)
    assert m.tokens == (11, 20, 21) and m.probs[0] == pytest.approx(1 / 5)
    assert m.probs[1:] == (0.5, 0.5)  # 2 3 11 -> 20 once
    cut = SuffixCache(4096, min_path_prob=0.15, follow_best=False)
    for follower in (10, 10, 10, 11):
        cut.add([1, 2, 3, follower, 20, 21])
    assert cut.match([0, 1, 2, 3], 3).tokens == (11,)  # the path floor keeps only the first


def test_follow_the_most_frequent_continuation():
    """SuffixDecoding's rule: at every token the most frequent follower of the current
    n-gram, from whichever text it was seen in (the copy may switch texts)."""
    cache = SuffixCache(4096, min_path_prob=0.0)
    for follower in (10, 10, 10, 11):
        cache.add([1, 2, 3, follower, 20, 21])
    m = cache.match([0, 1, 2, 3], 3)
    assert m.tokens == (10, 20, 21) and m.agreement == pytest.approx(3 / 5)  # 3 of 4 (+1)
    assert m.probs[1:] == (0.75, 0.75)  # 2 3 10 -> 20 three times in three
    mixed = SuffixCache(4096, min_path_prob=0.0)
    for _ in range(2):
        mixed.add([1, 7, 8, 9, 30, 31])  # after 7 8 9: 30 twice
    mixed.add([5, 6, 7, 8, 9, 40, 41])  # after 7 8 9: 40 once, most recently
    m = mixed.match([4, 5, 6, 7, 8, 9], 3)  # the most recent occurrence is the last text ...
    assert m.length == 5 and m.tokens == (30, 31)  # ... but 30 is the more frequent follower
    assert m.probs == pytest.approx((2 / 4, 2 / 3))
    ties = SuffixCache(4096, min_path_prob=0.0)
    for follower in (10, 11):
        ties.add([1, 2, 3, follower])
    assert ties.match([1, 2, 3], 1).tokens == (11,)  # a tie goes to the most recent


def test_matches_agree_with_a_brute_force_search():
    """Random texts over 6 symbols: every proposal is the continuation of a real cached
    occurrence of the query's last ``length`` tokens; a match of >= 12 tokens is found only
    when one exists and, where one exists, almost always (a later 12-gram may take its slot
    of the direct-mapped table: the 6- and 3-gram tables then still find the text)."""
    rng = random.Random(0)
    cache = SuffixCache(1 << 14, max_match=40, follow_best=False)
    best = SuffixCache(1 << 14, max_match=40)
    texts = [[rng.randrange(6) for _ in range(rng.randrange(20, 200))] for _ in range(30)]
    for t in texts:
        cache.add(t)
        best.add(t)
    grams = {tuple(t[i:i + 4]) for t in texts for i in range(len(t) - 3)}
    found = Counter()
    for _ in range(300):
        src = rng.choice(texts)
        cut = rng.randrange(1, len(src))
        query = [rng.randrange(6) for _ in range(rng.randrange(0, 5))] + src[max(0, cut - 30):cut]
        m = cache.match(query, 6)
        if m.tokens:
            tail = query[len(query) - m.length:]
            assert any(t[i:i + m.length] == tail and tuple(t[i + m.length:i + m.length + len(m.tokens)])
                       == m.tokens for t in texts for i in range(len(t) - m.length)), query
        path = query + list(best.match(query, 6).tokens)  # each token followed its 3 before somewhere
        assert all(tuple(path[j - 3:j + 1]) in grams for j in range(len(query), len(path)))
        has12 = any(t[i:i + 12] == query[-12:] for t in texts for i in range(len(t) - 12))
        has12 = has12 and len(query) >= 12
        assert has12 or m.length < 12
        found[m.length >= 12] += has12
        found["some"] += has12 and m.length >= 3
    assert found[True] >= 0.85 * (found[True] + found[False]) and found["some"] == found[True] + found[False]


def test_eviction_keeps_the_memory_bound_and_exact_counts():
    """FIFO eviction of whole texts: the token count stays under the bound, the arrays never
    grow, and the counts equal those of a cache built from the surviving texts only."""
    rng = np.random.default_rng(1)
    cache = SuffixCache(1000)
    nbytes = cache.nbytes
    assert nbytes <= 4 * 1000 + len(cache.orders) * 16 * 4 * 1000  # fixed by the flag, never grows
    texts = [rng.integers(0, 50, rng.integers(30, 300)).tolist() for _ in range(60)]
    for t in texts:
        cache.add(t)
        assert cache.tokens + len(cache._texts) <= 1000 and cache.nbytes == nbytes
    live = texts[-len(cache._texts):]
    assert cache.tokens == sum(map(len, live))
    fresh = SuffixCache(1000)
    for t in live:
        fresh.add(t)
    for n in cache.orders:
        assert np.array_equal(cache._count[n], fresh._count[n])
        assert np.array_equal(cache._follow[n], fresh._follow[n])
    long = list(range(5000))  # longer than the buffer: its tail is kept
    cache.add(long)
    assert cache.tokens == 999 and cache.match(long[-50:-10], 4).tokens == tuple(long[-10:-6])
    assert cache.match(long[:20], 4).tokens == ()


def test_evicted_texts_are_never_proposed():
    cache = SuffixCache(200)
    cache.add(list(range(1000, 1100)))
    for i in range(5):
        cache.add(list(range(2000 + 100 * i, 2050 + 100 * i)))
    assert cache.match(list(range(1000, 1020)), 4).tokens == ()


def test_shared_between_threads():
    cache = SuffixCache(5000)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(200):
                t = [rng.randrange(20) for _ in range(40)]
                cache.add(t)
                cache.match(t[:20], 8)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and cache.tokens <= 5000


def test_arguments():
    assert make_cache(False) is None and make_cache(0) is None and make_cache(None) is None
    assert make_cache(True).max_tokens == make_cache(True).max_tokens > 0
    shared = SuffixCache(100)
    assert make_cache(shared) is shared and make_cache(500).max_tokens == 500
    for bad in (10, -1, "x", 1.5):
        with pytest.raises(InvalidArgumentError):
            make_cache(bad)
    with pytest.raises(ValueError):
        SuffixCache(10)

    class Args:
        no_suffix_cache, suffix_cache_tokens = False, 10

    with pytest.raises(InvalidArgumentError, match="suffix-cache-tokens"):
        suffix_cache_arg(Args())
    Args.no_suffix_cache = True
    assert suffix_cache_arg(Args()) == 0


# ---------------------------------------------------------------------------- persistence


def test_saved_cache_loads_back_to_the_same_index(tmp_path):
    rng = np.random.default_rng(2)
    cache = SuffixCache(2000)
    for _ in range(30):  # more than fits: the file holds the live texts only
        cache.add(rng.integers(0, 40, rng.integers(20, 200)).tolist())
    path = tmp_path / "cache.npz"
    cache.save(path)
    back = SuffixCache(2000)
    assert back.load(path) == len(cache._texts) and back.tokens == cache.tokens
    for n in cache.orders:
        assert np.array_equal(back._count[n], cache._count[n])
        assert np.array_equal(back._follow[n], cache._follow[n])
    small = SuffixCache(500)  # a file larger than the bound: its newest texts, as if added in order
    small.load(path)
    ref = SuffixCache(500)
    for start, length in cache._texts:
        ref.add(cache._buf[cache._ring(start, length - 1)].tolist())
    assert small.tokens == ref.tokens <= 500 and [n for _, n in small._texts] == [n for _, n in ref._texts]
    assert np.array_equal(small._count[3], ref._count[3])
    SuffixCache(500).save(tmp_path / "empty.npz")
    assert SuffixCache(500).load(tmp_path / "empty.npz") == 0


def test_a_damaged_or_huge_cache_file_is_a_one_line_error(tmp_path, capsys):
    from adaspec import cli
    from adaspec.drafters.suffix import CacheFileError

    good = tmp_path / "good.npz"
    cache = SuffixCache(1000)
    cache.add(list(range(50)))
    cache.save(good)
    raw = good.read_bytes()
    bad = {"garbage": b"not a zip at all", "truncated": raw[:len(raw) // 2],
           "huge": b"0" * (64 * 1000 + (1 << 20) + 1)}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    np.savez(tmp_path / "other.npz", version=np.int64(99), tokens=np.arange(5), lengths=np.array([5]))
    np.savez(tmp_path / "lying.npz", version=np.int64(1), tokens=np.arange(5), lengths=np.array([9]))
    for name in (*bad, "other.npz", "lying.npz"):
        fresh = SuffixCache(1000)
        with pytest.raises(CacheFileError) as err:
            fresh.load(tmp_path / name)
        assert "\n" not in str(err.value) and fresh.tokens == 0  # left as it was
    model_dir = tmp_path / "tiny"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    capsys.readouterr()
    argv = ["generate", "hi", "--target", str(model_dir), "--draft", "ngram", "--dtype", "fp32",
            "--suffix-cache-file", str(tmp_path / "garbage")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "suffix cache file" in err and "\n" not in err and "Traceback" not in err


def test_cache_file_flag_loads_and_saves_at_exit(tmp_path):
    import atexit

    from adaspec.frontend.options import persisted_suffix_cache

    class Args:
        no_suffix_cache, suffix_cache_tokens, suffix_cache_file = False, 1000, str(tmp_path / "c.npz")

    first = persisted_suffix_cache(Args())  # no file yet: an empty cache, saved at exit
    atexit.unregister(first.save)
    first.add(list(range(100, 140)))
    first.save(Args.suffix_cache_file)
    second = persisted_suffix_cache(Args())
    atexit.unregister(second.save)
    assert second.tokens == 40 and second.match(list(range(100, 110)), 3).tokens == (110, 111, 112)
    Args.suffix_cache_file = None
    assert persisted_suffix_cache(Args()) == 1000


# ---------------------------------------------------------------------------- drafts


def test_the_cache_proposes_when_its_match_is_longer_and_learns_finished_texts():
    cache = SuffixCache(4096)
    drafter = NgramDrafter(64, cache=cache)
    drafter.reset()
    drafter.prefill([1, 2, 3])
    ids = [1, 2, 3, 4, 10, 11, 12, 13, 14, 15]
    drafter.rollback(ids)
    drafter.reset()  # the finished text enters the cache
    assert cache.texts_added == 1 and cache.tokens == len(ids)
    drafter.prefill([9, 9, 9])
    m = drafter.match([9, 9, 9, 4, 10, 11, 12], 3)
    assert m.origin == "cache" and m.tokens == (13, 14, 15) and drafter.cache_matches == 1
    own = drafter.match([9, 9, 9, 4, 10, 11, 12, 13, 9, 9, 9, 4, 10, 11, 12, 13], 3)
    assert own.origin == "text"  # the request's own match is longer
    assert drafter.report()["suffix_cache_matches"] == 1


def tiny_pair8():
    target = make_model("llama", vocab=8, hidden=32, seed=0, init=0.5)
    return loaded(target, name="tiny8"), loaded(perturbed(target, 0.6), name="tiny8-draft")


def test_generators_keep_their_cache_and_stay_greedy_identical():
    """A second request that repeats an earlier one drafts from the cache (greedy identical,
    more accepted per round); ``suffix_cache=False`` has no cache; a shared cache is shared."""
    target, draft = tiny_pair8()
    plain = SpeculativeGenerator(target, None, "fixed")
    prompts = ([1, 2, 3, 4, 5, 6, 0], [5, 3, 1, 7, 2], [1, 2, 3, 4, 5, 6, 0], [6, 1, 3, 2, 4])
    refs = [plain.generate(p, max_new_tokens=40).token_ids for p in prompts]
    shared = SuffixCache(1000)
    gens = {"ngram": SpeculativeGenerator(target, "ngram", "fixed", {"k": 6}),
            "off": SpeculativeGenerator(target, "ngram", "fixed", {"k": 6}, suffix_cache=False),
            "context": SpeculativeGenerator(target, [draft, "ngram"], "context", {"mode": "random"},
                                            suffix_cache=shared),
            "mixed": SpeculativeGenerator(target, [draft, "ngram"], "fixed", suffix_cache=shared)}
    assert gens["off"].suffix_cache is None and gens["context"].suffix_cache is shared
    matches = Counter()
    for p, ref in zip(prompts, refs, strict=True):
        for name, gen in gens.items():
            res = gen.generate(p, max_new_tokens=40)
            assert res.token_ids == ref, (name, p)
            matches[name] += res.stats.extra.get("suffix_cache_matches", 0)
    assert matches["ngram"] > 0 and matches["off"] == 0 and matches["context"] + matches["mixed"] > 0
    assert gens["ngram"].suffix_cache.texts_added == 3  # the last one waits for the next call


def test_sampling_distribution_with_cache_drafts():
    """Cache drafts are one-hot q like the request's own copies: 2,500 seeded samples of a
    2-token continuation (16 cells) against the exact distribution, with a cache holding
    texts that continue the prompt in every way."""
    target, _ = layered_pair(vocab=4, seed=3, init=0.1)
    prompt = [0, 1, 2, 3, 3, 0]  # no repeat inside the prompt of length >= 2
    cache = SuffixCache(4096, min_path_prob=0.0)
    rng = random.Random(0)
    for _ in range(40):
        cache.add([1, 2, 3, 3, 0] + [rng.randrange(4) for _ in range(6)])
    cfg = SamplingConfig(0.7)
    exact = exact_distribution(target.model, prompt, cfg, 2, 4)
    counts: Counter = Counter()
    totals: Counter = Counter()
    for seed in range(2500):
        drafter = NgramDrafter(4, cache=cache)
        out, st = run(target.model, drafter, prompt, SamplingConfig(0.7, seed=seed), 2, k=4)
        counts[tuple(out)] += 1
        totals.update(drafted=st.drafted_tokens, accepted=st.accepted_tokens,
                      cache=drafter.cache_matches)
    assert totals["cache"] > 2000 and 0 < totals["accepted"] < totals["drafted"], totals
    assert chi_square_p(counts, exact) > 1e-3


def test_sampling_distribution_with_context_planned_cache_copies():
    """``context`` plans cache copies from their frequencies (and picks the model or the own
    text otherwise): 1,000 seeded samples of a 3-token continuation (27 cells) against the
    exact distribution, with a cache whose texts continue the prompt in every way."""
    from adaspec.drafters.mixed import MixedDrafter
    from adaspec.drafters.model import ModelDrafter
    from adaspec.engine import Engine, StopRules
    from adaspec.policies.context import ContextPolicy
    from adaspec.types import GenerationStats

    target, draft = layered_pair(vocab=3, seed=3, init=0.1)
    prompt = [0, 1, 2, 2, 0, 1]
    exact = exact_distribution(target.model, prompt, SamplingConfig(0.7), 3, 3)
    cache = SuffixCache(4096, min_path_prob=0.0)
    rng = random.Random(1)
    for _ in range(30):
        cache.add([2, 0, 1] + [rng.randrange(3) for _ in range(5)])
    counts: Counter = Counter()
    won = 0
    for seed in range(1000):
        policy = ContextPolicy(mode="random", k_max=3, seed=seed)
        ngram = NgramDrafter(3, cache=cache)
        mixed = MixedDrafter(ModelDrafter(draft, 3), ngram, chooser=policy.choose_source)
        eng = Engine(target.model, 3, 256, mixed, policy)
        out: list[int] = []
        for chunk in eng.run(prompt, SamplingConfig(0.7, seed=seed), StopRules(3), GenerationStats()):
            out.extend(chunk)
        counts[tuple(out)] += 1
        won += ngram.cache_matches
    assert won > 300, won
    assert chi_square_p(*pooled(counts, exact, min_expected=10)) > 1e-3  # the rare cells pooled to >= 5


# ---------------------------------------------------------------------------- bench


def test_bench_cache_argument():
    on, off = parse_methods("context:draft=model+ngram,context:draft=model+ngram:cache=off")
    assert on.cache and not off.cache and off.key.endswith("cache=off")
    for bad in ("context:cache=off", "fixed:k=4:draft=ngram:cache=maybe"):
        with pytest.raises(MethodError, match="cache="):
            parse_methods(bad)


# ---------------------------------------------------------------------------- vLLM proposer


def test_vllm_core_shares_one_cache_across_requests():
    """Requests that repeat an earlier request's (noisy, unrepeating) output: with the shared
    cache the later ones draft it and accept it; every output stays its own truth."""
    from test_integrations_adaptive import FakeEngine, noise
    from test_integrations_adaptive import run as drive

    from adaspec.integrations.adaptive import AdaptiveNgram

    body = noise(200, 7)
    truths = [[900 + r] * 3 + list(range(500, 537)) + body for r in range(4)]  # 40-token prompts
    results = {}
    for name, cache in (("off", None), ("on", SuffixCache(10_000))):
        engine = FakeEngine(truths, prompt_len=40, max_new=120, max_rows=1)
        core = AdaptiveNgram(k_max=8, adaptive=False, cache=cache)
        drive(core, engine)
        for r, t in enumerate(truths):
            assert engine.outputs[r][:120] == t[40:160]
        results[name] = core.report()
    assert results["on"]["suffix_cache_texts"] == 3  # the last request is still in the batch
    assert results["on"]["accepted"] > results["off"]["accepted"] + 200, results


def test_vllm_proposer_holds_a_shared_cache():
    from types import SimpleNamespace

    from adaspec.integrations.vllm import AdaspecNgramProposer

    cfg = SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=4),
                          model_config=SimpleNamespace(max_model_len=256))
    p = AdaspecNgramProposer(cfg)
    assert p.core.cache is p.cache and p.cache.max_tokens == AdaspecNgramProposer.suffix_cache_tokens

    class Off(AdaspecNgramProposer):
        suffix_cache_tokens = 0

    assert Off(cfg).core.cache is None


# ---------------------------------------------------------------------------- bench --in-order


def test_bench_in_order_warms_the_cache_and_a_resume_rewarms_it(tmp_path):
    """Repeated prompts: --in-order drafts the repeat from the cache (identical outputs), the
    default run starts every prompt cold, and a resumed --in-order run drafts exactly as an
    uninterrupted one (the finished rows' answers are put back first)."""
    from test_bench import Prompt, make_tiny_pair

    from adaspec.bench.report import read_results
    from adaspec.bench.runner import BenchConfig, run_benchmark
    from adaspec.checkpoints.loader import load_model

    t, _ = make_tiny_pair(tmp_path / "m")
    target = load_model(str(t), dtype="fp32")
    prompts = [Prompt(f"p{i}", "x", [text]) for i, text in
               enumerate(["Write a poem.", "Say hi.", "Write a poem.", "Say hi.", "Write a poem."])]
    methods = "ar,fixed:k=6:draft=ngram,fixed:k=6:draft=ngram:cache=off"

    def bench(out: str, in_order: bool, stop_after: int | None = None) -> list[dict]:
        cfg = BenchConfig(methods=methods, dataset="tiny", split="test", max_new_tokens=40, dtype="fp32",
                          warmup=1, out=str(tmp_path / out), target="tiny", progress=False, memory=False,
                          command="test", in_order=in_order)
        run_benchmark(cfg, prompts=prompts, target=target, stop_after=stop_after)
        return read_results(tmp_path / out / "results.jsonl")

    def by(rows: list[dict], method: str) -> dict[str, dict]:
        return {r["prompt_id"]: r for r in rows if r["method"] == method}

    warm, cold = bench("warm", True), bench("cold", False)
    hits = lambda r: r["extra"][0].get("suffix_cache_matches", 0)  # noqa: E731
    for rows in (warm, cold):
        ar = by(rows, "ar")
        for method in methods.split(",")[1:]:
            assert all(r["token_ids"] == ar[p]["token_ids"] for p, r in by(rows, method).items())
    on = by(warm, "fixed:k=6:draft=ngram")
    assert hits(on["p0"]) == 0 and hits(on["p2"]) > 0 and hits(on["p4"]) > 0
    assert all(hits(r) == 0 for r in by(cold, "fixed:k=6:draft=ngram").values())
    assert all(hits(r) == 0 for r in by(warm, "fixed:k=6:draft=ngram:cache=off").values())
    bench("resumed", True, stop_after=7)
    resumed = by(bench("resumed", True), "fixed:k=6:draft=ngram")
    for p, r in on.items():
        assert (hits(resumed[p]), resumed[p]["accepted_tokens"]) == (hits(r), r["accepted_tokens"]), p


def test_templated_dataset_splits():
    from adaspec.bench.datasets import bucket_of, data_root, in_split, load_dataset

    if not (data_root() / "code_alpaca").is_dir():
        pytest.skip("../shared/data is absent")
    dev, test = load_dataset("templated", "dev"), load_dataset("templated", "test")
    assert len(dev) >= 30 and not {p.id for p in dev} & {p.id for p in test}
    kinds = [p.id.split("/")[1] for p in dev[:12]]
    assert kinds[:6] == ["html", "cli", "unittest", "math", "tool", "quote"] and kinds[6:] == kinds[:6]
    assert all(len(p.turns) == 2 for p in dev if "/quote/" in p.id)
    first = [p.id.split("/", 2)[2] for p in dev[:60]]  # math and tool take gsm8k rows from both ends
    assert len(first) == len(set(first))
    gsm = {f"gsm8k/{i}": r for i, r in enumerate(load_dataset("gsm8k", "all"))}
    for p in dev:
        if "/math/" in p.id or "/tool/" in p.id:  # a row keeps its source set's bucket
            q = gsm[p.id.split("/", 2)[2]].turns[0]
            assert in_split(bucket_of("gsm8k:" + q), "dev") and q in p.turns[0]


def test_replay_stand_in_target_follows_the_record():
    from adaspec.bench.suffix_replay import StandInTarget

    t = StandInTarget(10, {1: 1.0, 4: 4.0, 8: 6.0})
    assert [t.cost_ms(n) for n in (1, 2, 4, 6, 8, 10)] == [1.0, 2.0, 4.0, 5.0, 6.0, 6.0 + 2 * 1.4]
    t.full = [1, 2, 3, 4, 5, 6]
    out = t.forward([1, 2, 3, 9, 9], 3)  # rows predict positions 3, 4, 5; the draft left the record at 3
    assert out.logits.argmax(-1).tolist()[0] == 4 and out.logits[1:].sum() == 0
    assert t.forward([1, 2, 3, 4], 2).logits.argmax(-1).tolist() == [4, 5]


def test_ceiling_replay_counts_rounds_with_and_without_the_cache():
    from adaspec.bench.suffix_ceiling import replay_output

    out = list(range(100, 140))  # no token repeats inside it
    rounds: Counter = Counter()
    for rule in ("own", "cache", "best"):
        cache = SuffixCache(4096, min_path_prob=0.0)
        cache.add_generation([1, 2, 3], out)  # an earlier request answered the same

        def tally(k: int, a: int, c: int, rule: str = rule) -> None:
            assert 0 <= a <= k and 1 <= c <= a + 1
            rounds[rule] += 1
            rounds[rule + " tokens"] += c

        replay_output([9, 1, 2, 3], out, cache, rule, 8, tally)
        assert rounds[rule + " tokens"] == 40
    assert rounds["own"] == 40 and rounds["cache"] == rounds["best"] == 5  # 8 copied + 1 a round
