"""Tests of prompt lookup's corpus (glm6b.inference.lookup.CorpusIndex and propose): the index against its rule
written out, documents never crossed, exact keys whatever the ids, the choice between the context's proposal
and the corpus's, corpus files and their errors, and the tokens of greedy decoding with a corpus (golden
single rows and batches, long accepted runs and frequent rejections), chat, eval, the server's scheduler with
rows joining mid-batch, the flags and recipes."""

from __future__ import annotations

import json
import random

import pytest
import torch

from glm6b.config import DataError, GenerationConfig
from glm6b.inference import generation, scheduler
from glm6b.inference.chat import build_prompt, chat, stream_chat
from glm6b.inference.generation import generate
from glm6b.inference.lookup import CorpusIndex, LookupStats, corpus_index, propose, propose_from_context

from helpers import GOLDEN, golden_cases, one_error_line, run_cli, run_scheduler, write_adgen_sample

BATCH = golden_cases()["generate_batch_greedy"]
SINGLE = golden_cases()["generate_single_greedy"]
CHAT = golden_cases()["chat"]


# ----------------------------------------------------------------------------------- the index


def by_the_rule(documents, context, max_tokens, max_ngram):
    """The corpus proposer's rule written out: the longest suffix (n from max_ngram down) that occurs in a document
    with a token after it; then, token by token, the commonest next token among the occurrences still followed
    (the smaller id on a tie), never past a document's end. Returns (tokens, n)."""
    for n in range(min(max_ngram, len(context)), 0, -1):
        ngram = list(context[len(context) - n:])
        found = [(d, i + n) for d, doc in enumerate(documents) for i in range(len(doc) - n) if doc[i:i + n] == ngram]
        if not found:
            continue
        tokens = []
        while len(tokens) < max_tokens:
            following = {}
            for d, at in found:
                if at < len(documents[d]):
                    following[documents[d][at]] = following.get(documents[d][at], 0) + 1
            if not following:
                break
            best = min(following, key=lambda token: (-following[token], token))
            tokens.append(best)
            found = [(d, at + 1) for d, at in found if at < len(documents[d]) and documents[d][at] == best]
        return tokens, n
    return [], 0


def test_the_longest_suffix_and_its_most_frequent_continuation():
    documents = [[1, 2, 3, 4], [1, 2, 3, 4], [2, 3, 5, 6], [9, 2, 3, 5], [7, 3, 8]]
    index = CorpusIndex(documents, max_ngram=3)
    # "1 2 3" occurs twice, both followed by 4 (the longest suffix wins over "2 3", mostly followed by 5).
    assert index.lookup([0, 1, 2, 3], 3, 3) == ([4], 3)
    # "2 3": followed by 4 twice and 5 twice (the smaller id on a tie), then 4 ends its documents.
    assert index.lookup([8, 2, 3], 3, 3) == ([4], 2)
    # "3": followed by 4, 4, 5, 5, 8; 4 ends both of its documents, where 5 6 would have gone on.
    assert index.propose([3], 4, 3) == [4]
    # The suffix looked up is at most max_ngram (and the index's) tokens long.
    assert index.lookup([0, 1, 2, 3], 3, 1) == ([4], 1)
    assert CorpusIndex(documents, max_ngram=1).lookup([0, 1, 2, 3], 3, 3) == ([4], 1)
    assert index.lookup([9, 9], 3, 3) == ([2, 3, 5], 1)  # only one 9 has a continuation
    assert index.lookup([42], 3, 3) == ([], 0)
    assert index.lookup([1, 2], 0, 3) == ([], 2)  # nothing asked for: the match is still reported
    assert index.propose(torch.tensor([7, 3]), 5, 3) == [8]  # a tensor context; 8 ends its document
    assert CorpusIndex([]).propose([1], 3) == [] and CorpusIndex([[], [5]]).documents == 1


def test_continuations_never_cross_a_document_boundary():
    index = CorpusIndex([[1, 2, 3], [4, 5, 6], [3, 4, 7]], max_ngram=2)
    # "2 3" ends its document (the next one's 4 5 6 does not continue it): the shorter "3", which 4 7 follows.
    assert index.lookup([2, 3], 4, 2) == ([4, 7], 1)
    assert index.propose([3], 4) == [4, 7]
    assert index.propose([6], 2) == []  # every document's last token has nothing after it
    assert index.propose([3, 4], 3) == [7]


@pytest.mark.parametrize("few", [CorpusIndex.FEW, 0], ids=["python", "numpy"])
def test_the_index_follows_its_rule_on_random_corpora(monkeypatch, few):
    """Continuations of few occurrences are counted in Python, of many with numpy: both follow the rule."""
    monkeypatch.setattr(CorpusIndex, "FEW", few)
    rng = random.Random(0)
    for _ in range(2000):
        documents = [[rng.randint(0, 4) for _ in range(rng.randint(0, 12))] for _ in range(rng.randint(0, 6))]
        max_ngram = rng.randint(1, 4)
        index = CorpusIndex(documents, max_ngram)
        context = [rng.randint(0, 5) for _ in range(rng.randint(0, 6))]
        max_tokens, asked = rng.randint(0, 6), rng.randint(1, 5)
        assert index.lookup(context, max_tokens, asked) == by_the_rule(documents, context, max_tokens,
                                                                       min(asked, max_ngram)), (documents, context)


@pytest.mark.parametrize("high", [2 ** 17 - 1, 2 ** 30], ids=["one packed word", "several words"])
def test_keys_are_exact_whatever_the_ids(high):
    """The sort keys are the tokens themselves, packed into int64 words as their bits allow (one word for
    ChatGLM's ids and max_ngram 3, several for larger ids): ids that differ only in their highest or lowest bit
    never match each other, as they could if the keys were hashes."""
    rng = random.Random(1)
    alphabet = [0, 1, high, high - 1, high ^ 1, 5]
    for _ in range(400):
        documents = [[rng.choice(alphabet) for _ in range(rng.randint(1, 10))] for _ in range(rng.randint(1, 5))]
        index = CorpusIndex(documents, max_ngram=3)
        context = [rng.choice(alphabet) for _ in range(rng.randint(1, 4))]
        assert index.lookup(context, 4, 3) == by_the_rule(documents, context, 4, 3), (documents, context)
    with pytest.raises(ValueError, match="must be in"):
        CorpusIndex([[1, -1]])


def test_a_common_ngram_is_answered_from_a_sample_of_its_occurrences(monkeypatch):
    """Beyond SAMPLE occurrences an even sample of them is examined (the run is sorted by what follows, so an
    even sample keeps the proportions): the majority continuation still wins, and every proposal is one
    that occurs."""
    monkeypatch.setattr(CorpusIndex, "SAMPLE", 16)
    documents = [[7, 1, 2]] * 700 + [[7, 3, 4]] * 300 + [[7, 5]] * 50
    index = CorpusIndex(documents, max_ngram=2)
    assert index.propose([7], 3) == [1, 2]
    assert index.propose([9, 7], 3) == [1, 2]


# ----------------------------------------------------------------------------------- context or corpus


def test_the_context_proposes_unless_the_corpus_matches_a_longer_suffix():
    corpus = CorpusIndex([[5, 6, 7, 8, 9], [1, 2, 3, 4]], max_ngram=3)
    # The context has "6 7" (n = 2) followed by 1; the corpus has "5 6 7" (n = 3): the corpus wins.
    assert propose([6, 7, 1, 5, 6, 7], 2, 3, corpus) == [8, 9]
    # Both match "2 3" (n = 2): a tie goes to the context, which copies 0 (and then what it copied).
    assert propose([2, 3, 0, 9, 2, 3], 2, 3, corpus) == [0, 9]
    # The context has no match: the corpus proposes; neither: nothing.
    assert propose([2, 3], 3, 3, corpus) == [4]
    assert propose([11, 12], 3, 3, corpus) == []
    # Without a corpus (and with one whose matches are shorter) it is propose_from_context.
    rng = random.Random(2)
    for _ in range(500):
        context = [rng.randint(0, 3) for _ in range(rng.randint(0, 16))]
        assert propose(context, 3, 3) == propose_from_context(context, 3, 3)
        assert propose(context, 3, 3, CorpusIndex([[9, 9, 9]])) == propose_from_context(context, 3, 3)
    assert propose([2, 3], 0, 3, corpus) == []


# ----------------------------------------------------------------------------------- corpus files


def _lines(path, rows):
    path.write_text("".join((json.dumps(r, ensure_ascii=False) if not isinstance(r, str) else r) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def test_a_corpus_file_is_its_answers_as_a_model_writes_them(tok, tmp_path):
    answers = ["这款连衣裙采用雪纺面料。", "复古上衣很好看。"]
    jsonl = _lines(tmp_path / "train.json", [{"content": "类型#裙", "summary": answers[0]}, "",
                                             {"content": "类型#上衣", "summary": answers[1]},
                                             {"content": "x", "summary": ""}])
    text = tmp_path / "answers.txt"
    text.write_text(answers[0] + "\n\n" + answers[1] + "\n", encoding="utf-8")
    expected = CorpusIndex([[tok.bos_token_id, *tok.encode(a, add_special_tokens=False), tok.eos_token_id]
                            for a in answers])
    for path in (jsonl, text):
        index = CorpusIndex.from_file(path, tok)
        assert (index.documents, index.tokens) == (2, expected.tokens)
        first = tok.encode(answers[0], add_special_tokens=False)
        for context in ([tok.bos_token_id], [tok.bos_token_id, *first[:3]], first[-2:], [tok.eos_token_id]):
            assert index.lookup(context, 8, 3) == expected.lookup(context, 8, 3)
        # <sop> starts an answer and <eop> ends it, so both are proposed too.
        assert index.propose([tok.bos_token_id, first[0]], 40) == [*first[1:], tok.eos_token_id]
    assert str(index) == f"CorpusIndex(2 documents, {expected.tokens} tokens, max_ngram=3)"


def test_corpus_file_errors_name_the_file_and_the_line(tok, tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(DataError, match=f"{missing}: cannot read the prompt-lookup corpus"):
        CorpusIndex.from_file(missing, tok)
    with pytest.raises(DataError, match="cannot read the prompt-lookup corpus"):
        corpus_index(missing, tok)
    cases = [([{"summary": "a"}, "{not json"], "line 2: not valid JSON"),
             ([{"summary": "a"}, "", {"content": "b"}], r"line 3: missing field 'summary' \(fields: 'content'\)"),
             ([{"summary": 3}], "line 1: field 'summary' must be a string, got int"),
             (["[1, 2]"], "line 1: expected a JSON object, got list"),
             ([{"summary": ""}], "no answers to propose from")]
    for rows, message in cases:
        path = _lines(tmp_path / "bad.jsonl", rows)
        with pytest.raises(DataError, match=message) as error:
            CorpusIndex.from_file(path, tok)
        assert str(path) in str(error.value)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("ok\n".encode() + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=f"{latin}, line 2: not UTF-8 text"):
        CorpusIndex.from_file(latin, tok)


def test_a_corpus_file_is_indexed_once_per_version_and_tokenizer(tok, tmp_path):
    import os

    path = _lines(tmp_path / "c.jsonl", [{"summary": "复古上衣很好看。"}])
    first = corpus_index(path, tok)
    assert corpus_index(str(path), tok) is first  # the cache, whatever the path's type
    assert corpus_index(path, tok, max_ngram=2) is not first
    _lines(path, [{"summary": "黑色裤子百搭。"}, {"summary": "复古上衣很好看。"}])
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10 ** 9))
    assert corpus_index(path, tok).documents == 2  # the file changed: indexed again


# ----------------------------------------------------------------------------------- greedy: the same tokens


@pytest.fixture
def with_corpus(monkeypatch):
    """Make generate's and the scheduler's prompt_lookup_corpus the CorpusIndex of the token sequences given (the
    golden model's answers are bytes that do not survive a trip through text)."""
    def use(documents):
        index_of = lambda path, tokenizer, max_ngram: CorpusIndex(documents, max_ngram)  # noqa: E731
        monkeypatch.setattr(generation, "corpus_index", index_of)
        monkeypatch.setattr(scheduler, "corpus_index", index_of)
        return {"prompt_lookup_corpus": "answers", "tokenizer": object()}
    return use


def _answer(item, row=0):
    return item["sequences"][row][len(item["input_ids"][row]):]


def _with_errors(tokens, every=5):
    """The tokens with every `every`-th one replaced: proposals kept up to a wrong token, then rejected."""
    return [t if (i + 1) % every else 7 for i, t in enumerate(tokens)]


def _generate(model, ids, k, corpus_options, **kwargs):
    stats = LookupStats()
    out = generate(model, ids, prompt_lookup_num_tokens=k, stats=stats, **corpus_options, **kwargs)
    return out, stats


@pytest.mark.parametrize("item", SINGLE["items"], ids=lambda item: item["text"][:12])
def test_golden_single_greedy_with_the_answers_as_corpus_takes_long_accepted_runs(model, with_corpus, item):
    bos = model.config.bos_token_id
    out, stats = _generate(model, torch.tensor(item["input_ids"]), 4, with_corpus([[bos, *_answer(item)]]),
                           max_new_tokens=SINGLE["max_new_tokens"])
    assert out.tolist() == item["sequences"]
    assert stats.acceptance_rate > 0.9 and stats.tokens_per_step >= 2.5 and max(stats.widths) == 5


def test_golden_single_greedy_with_a_corpus_of_errors_and_of_noise(model, with_corpus):
    """A corpus of the answers with every fifth token wrong (long runs kept, then a rejection), and one of random
    tokens (proposals found and mostly rejected): the golden tokens either way."""
    bos = model.config.bos_token_id
    rng = random.Random(3)
    noise = [[rng.randrange(5, 1100) for _ in range(30)] for _ in range(40)]
    totals = LookupStats()
    for documents in ([[bos, *_with_errors(_answer(item))] for item in SINGLE["items"]], noise):
        for item in SINGLE["items"]:
            out, stats = _generate(model, torch.tensor(item["input_ids"]), 4, with_corpus(documents),
                                   max_new_tokens=SINGLE["max_new_tokens"])
            assert out.tolist() == item["sequences"]
            totals.proposed += stats.proposed
            totals.accepted += stats.accepted
    assert totals.accepted >= 20 and totals.proposed - totals.accepted >= 10


@pytest.mark.parametrize("k", [1, 4, 8])
def test_golden_batch_greedy_with_a_corpus(model, tok, with_corpus, k):
    bos = model.config.bos_token_id
    documents = [[bos, *_with_errors(_answer(BATCH, row), every=7)] for row in range(3)]
    batch = tok(BATCH["texts"], padding=True, return_tensors="pt")
    stats = LookupStats()
    out = generate(model, **batch, max_new_tokens=BATCH["max_new_tokens"], prompt_lookup_num_tokens=k, stats=stats,
                   **with_corpus(documents))
    assert out.tolist() == BATCH["sequences"]
    assert stats.accepted > 0 and stats.proposed > stats.accepted
    assert stats.tokens_per_step > 1.3


def test_generate_reads_a_corpus_file_with_the_tokenizer(model, tok, tmp_path):
    """The whole path with a real file (ADGEN jsonl, encoded with the tokenizer): the tokens of ordinary decoding;
    without a tokenizer, or without prompt lookup, the setting is refused."""
    corpus = str(write_adgen_sample(tmp_path / "train.json"))
    batch = tok(["类型#裙*材质#雪纺", "你好"], padding=True, return_tensors="pt")
    plain = generate(model, **batch, max_new_tokens=16)
    stats = LookupStats()
    looked_up = generate(model, **batch, max_new_tokens=16, prompt_lookup_num_tokens=4, prompt_lookup_corpus=corpus,
                         tokenizer=tok, stats=stats)
    assert torch.equal(plain, looked_up) and stats.proposed > 0
    with pytest.raises(ValueError, match="prompt_lookup_corpus needs the tokenizer"):
        generate(model, **batch, max_new_tokens=4, prompt_lookup_num_tokens=4, prompt_lookup_corpus=corpus)
    with pytest.raises(ValueError, match="needs prompt_lookup_num_tokens"):
        generate(model, **batch, max_new_tokens=4, prompt_lookup_corpus=corpus, tokenizer=tok)
    with pytest.raises(ValueError, match="prompt_lookup_corpus must be a file path"):
        GenerationConfig(prompt_lookup_num_tokens=4, prompt_lookup_corpus=3).validate()
    with pytest.raises(DataError, match="no-such.json: cannot read the prompt-lookup corpus"):
        generate(model, **batch, max_new_tokens=4, prompt_lookup_num_tokens=4,
                 prompt_lookup_corpus=str(tmp_path / "no-such.json"), tokenizer=tok)


def test_chat_stream_chat_and_eval_with_a_corpus(model, tok, tmp_path):
    from glm6b.eval.evaluate import generate_predictions

    corpus = tmp_path / "answers.txt"
    corpus.write_text(CHAT["response"] + "\n" + "黑色裤子百搭。\n", encoding="utf-8")
    kwargs = dict(max_length=CHAT["max_length"], do_sample=False, prompt_lookup_num_tokens=4,
                  prompt_lookup_corpus=str(corpus))
    assert chat(model, tok, CHAT["query"], CHAT["history"], **kwargs)[0] == CHAT["response"]
    partials = [p for p, _ in stream_chat(model, tok, CHAT["query"], CHAT["history"], **kwargs)]
    assert partials[-1] == CHAT["response"] and len(partials) == len(CHAT["generated_ids"])
    prompts = ["类型#裙*材质#雪纺", "你好", "546 1125"]
    plain, _ = generate_predictions(model, tok, prompts, batch_size=2, max_new_tokens=12, progress=False)
    looked_up, _ = generate_predictions(model, tok, prompts, batch_size=2, max_new_tokens=12, progress=False,
                                        prompt_lookup_num_tokens=4, prompt_lookup_corpus=str(corpus))
    assert looked_up == plain


# ----------------------------------------------------------------------------------- the server's scheduler

CHATS = [("你好", []), ("hello world, how are you", [("a", "b")]), ("写一首诗", []), ("x" * 40, []),
         ("今天天气", [("你好", "我很好")])]


def test_scheduler_with_a_corpus_gives_chat_answers_to_rows_joining_mid_batch(model, tok, with_corpus):
    """Greedy requests on 3 rows joining at different steps, proposing from a corpus of their own answers with
    errors in them: each answer is chat()'s, some events bring several tokens, and fewer steps run."""
    from glm6b.inference.scheduler import Request, SamplingParams, Scheduler

    answers = []
    for i, (query, history) in enumerate(CHATS):
        ids = torch.tensor([tok.encode(build_prompt(query, history))])
        answers.append(generate(model, ids, max_new_tokens=12 + 3 * i)[0, ids.shape[1]:].tolist())
    with_corpus([[model.config.bos_token_id, *_with_errors(a, every=6)] for a in answers])

    def serve_all(prompt_lookup):
        served = Scheduler(model, tok, max_batch=3, max_queue=8, prompt_lookup=prompt_lookup,
                           prompt_lookup_corpus="answers" if prompt_lookup else None)
        assert (served.corpus is not None) == bool(prompt_lookup)
        jobs = []
        for i, (query, history) in enumerate(CHATS):
            events = []
            jobs.append((Request(tok.encode(build_prompt(query, history)),
                                 SamplingParams(max_new_tokens=12 + 3 * i, do_sample=False), events.append), events))
        run_scheduler(served, {0: [jobs[0][0]], 2: [jobs[1][0], jobs[2][0]], 5: [j[0] for j in jobs[3:]]})
        return served, [events for _, events in jobs]

    plain, plain_events = serve_all(0)
    looked_up, lookup_events = serve_all(4)
    several = False
    for (query, history), plain_job, job in zip(CHATS, plain_events, lookup_events):
        expected, _ = chat(model, tok, query, history, do_sample=False, max_new_tokens=plain_job[-1].completion_tokens)
        assert job[-1].full_text == plain_job[-1].full_text == expected, query
        assert "".join(e.text for e in job) == expected, query
        tokens = [e.completion_tokens for e in job]
        several |= any(b - a > 1 for a, b in zip(tokens, tokens[1:]))
    assert several
    assert looked_up.generated_tokens_total == plain.generated_tokens_total
    assert looked_up.steps_total < plain.steps_total


def test_the_scheduler_indexes_a_corpus_file_once_and_only_where_lookup_runs(model, tok, tmp_path):
    from glm6b.inference.scheduler import Scheduler

    corpus = str(write_adgen_sample(tmp_path / "train.json"))
    assert Scheduler(model, tok, prompt_lookup=3, prompt_lookup_corpus=corpus).corpus is corpus_index(corpus, tok)
    assert Scheduler(model, tok, prompt_lookup="auto", prompt_lookup_corpus=corpus).corpus is None  # auto: off here
    with pytest.raises(ValueError, match="needs prompt_lookup_num_tokens"):
        Scheduler(model, tok, prompt_lookup_corpus=corpus)


# ----------------------------------------------------------------------------------- flags and recipes


def test_the_corpus_flag_and_its_errors(tmp_path, capsys):
    from glm6b.cli import build_parser, sampling_options

    corpus = write_adgen_sample(tmp_path / "train.json")
    for command in (["chat"], ["generate", "--prompt", "x"], ["eval", "--data", "d", "--output-dir", "o"], ["serve"]):
        args = build_parser().parse_args([command[0], "--model", "m", *command[1:], "--prompt-lookup", "4",
                                          "--prompt-lookup-corpus", str(corpus)])
        assert args.prompt_lookup_corpus == str(corpus)
        assert build_parser().parse_args([command[0], "--model", "m", *command[1:]]).prompt_lookup_corpus is None
        if command[0] != "serve":
            assert sampling_options(args)["prompt_lookup_corpus"] == str(corpus)
    missing = tmp_path / "missing.json"
    code, err = run_cli(capsys, "generate", "--model", GOLDEN, "--prompt", "x", "--prompt-lookup", "4",
                        "--prompt-lookup-corpus", missing)
    assert code != 0 and f"--prompt-lookup-corpus {missing}: no such file" in one_error_line(err)
    code, err = run_cli(capsys, "generate", "--model", GOLDEN, "--prompt", "x", "--prompt-lookup-corpus", corpus)
    assert code != 0 and "add --prompt-lookup K" in one_error_line(err)
    bad = _lines(tmp_path / "bad.json", [{"summary": "a"}, {"content": "b"}])
    code, err = run_cli(capsys, "generate", "--model", GOLDEN, "--prompt", "x", "--max-new-tokens", "4",
                        "--prompt-lookup", "4", "--prompt-lookup-corpus", bad)
    assert code != 0 and f"{bad}, line 2: missing field 'summary'" in one_error_line(err)


def test_a_recipe_proposes_from_its_own_training_answers(tmp_path):
    from glm6b.train.recipe import RecipeError, check_recipe, load_recipe, lookup_corpus

    train = write_adgen_sample(tmp_path / "train.json")
    path = tmp_path / "r.yaml"
    path.write_text(f"method: lora\ndata:\n  train_data: {train}\n  eval_data: {train}\ngeneration:\n"
                    f"  prompt_lookup_num_tokens: 4\n  prompt_lookup_corpus: train\n")
    recipe = load_recipe(path)
    assert recipe.generation.prompt_lookup_corpus == "train" and lookup_corpus(recipe) == str(train)
    check_recipe(recipe, "predict", ["x"])
    for override, message in ((["data.train_data=null"], "which is not set"),
                              ([f"data.train_data={tmp_path}"], "holds encoded rows"),
                              ([f"data.train_data={tmp_path / 'none.json'}"], "no such file"),
                              (["data.response_column=answer"], "data.response_column = 'answer'"),
                              ([f"generation.prompt_lookup_corpus={tmp_path / 'x.txt'}"], "x.txt: no such file")):
        with pytest.raises(RecipeError, match=message):
            check_recipe(load_recipe(path, override), "predict", ["x"])
    other = tmp_path / "answers.txt"
    other.write_text("复古上衣很好看。\n", encoding="utf-8")
    assert lookup_corpus(load_recipe(path, [f"generation.prompt_lookup_corpus={other}"])) == str(other)
    # An override is checked alone (the file's prompt_lookup_num_tokens still counts); without it, lookup is off.
    recipe = load_recipe(path, ["generation.prompt_lookup_corpus=train"])
    with pytest.raises(RecipeError, match="needs generation.prompt_lookup_num_tokens"):
        check_recipe(load_recipe(path, ["generation.prompt_lookup_num_tokens=0"]), "predict", ["x"])

