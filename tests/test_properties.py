"""Properties that must hold for every input, checked on inputs that `hypothesis` generates: the
tokenizer (round trips, [CLS]/[SEP] placement, truncation, padding masks), image padding, and the
metrics (VQA accuracy, retrieval recall, NLVR2 consistency). Few examples each, no deadlines: a
few seconds per property."""
import math
import re
import string

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pixel_bert import metrics
from pixel_bert.images import pad_images
from pixel_bert.tokenizer import WordPieceTokenizer

PROPERTY = settings(max_examples=60, deadline=None, database=None, print_blob=True)  # a failure prints how to replay it
# Printable ASCII without the brackets of "[CLS]" / "[SEP]" / "[MASK]": the tokenizer keeps those
# strings as special tokens wherever they appear (that is how fill_mask reads [MASK]).
TEXT = st.text(alphabet=string.ascii_letters + string.digits + string.punctuation.replace("[", "").replace("]", "")
               + " \t\n", max_size=80)


@pytest.fixture(scope="module")
def bert_tokenizer(minilm_dir):
    """bert-base-uncased's WordPiece vocabulary (30,522 pieces), as a pixel-bert tokenizer."""
    return WordPieceTokenizer(f"{minilm_dir}/vocab.txt")


# ---- tokenizer -------------------------------------------------------------------------------------

def decode(tokenizer, ids):
    """Words from WordPiece ids: a '##' piece continues the word before it."""
    words = []
    for token in tokenizer.convert_ids_to_tokens(ids):
        if token.startswith("##") and words:
            words[-1] += token[2:]
        else:
            words.append(token)
    return words


@PROPERTY
@given(text=TEXT)
def test_encode_then_decode_gives_back_the_lowercased_words(bert_tokenizer, text):
    """BERT's uncased pipeline: lower-case, split on white space and around each punctuation mark,
    WordPiece; every ASCII character has a piece, so nothing becomes [UNK] and decoding restores
    the words exactly."""
    ids = bert_tokenizer.encode(text, max_length=10 ** 6)
    assert ids[0] == bert_tokenizer.cls_id and ids[-1] == bert_tokenizer.sep_id
    words = re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())
    assert decode(bert_tokenizer, ids[1:-1]) == words
    assert bert_tokenizer.unk_id not in ids


@PROPERTY
@given(texts=st.lists(TEXT, min_size=1, max_size=4), max_length=st.integers(3, 24))
def test_batches_are_cls_text_sep_truncated_and_masked_exactly(bert_tokenizer, texts, max_length):
    full = [bert_tokenizer.encode(t, max_length=10 ** 6) for t in texts]
    batch = bert_tokenizer(texts, max_length=max_length)
    lengths = [min(len(ids), max_length) for ids in full]
    assert batch.input_ids.shape == batch.attention_mask.shape == (len(texts), max(lengths))
    for row, (ids, n) in enumerate(zip(full, lengths)):
        got = batch.input_ids[row].tolist()
        assert batch.attention_mask[row].tolist() == [True] * n + [False] * (len(got) - n)
        assert got[0] == bert_tokenizer.cls_id and got[n - 1] == bert_tokenizer.sep_id
        assert got[1: n - 1] == ids[1: n - 1]                       # truncation keeps the start
        assert set(got[n:]) <= {bert_tokenizer.pad_id}
        assert bert_tokenizer.cls_id not in got[1:n] and bert_tokenizer.sep_id not in got[1: n - 1]


# ---- image padding ---------------------------------------------------------------------------------

@PROPERTY
@given(sizes=st.lists(st.tuples(st.integers(1, 13), st.integers(1, 13)), min_size=1, max_size=4),
       size_divisor=st.integers(1, 8))
def test_pad_images_keeps_every_pixel_and_masks_exactly_the_real_ones(sizes, size_divisor):
    images = [torch.randn(3, h, w) for h, w in sizes]
    batch, mask = pad_images(images, size_divisor)
    height = math.ceil(max(h for h, _ in sizes) / size_divisor) * size_divisor
    width = math.ceil(max(w for _, w in sizes) / size_divisor) * size_divisor
    assert batch.shape == (len(images), 3, height, width) and mask.shape == (len(images), height, width)
    for i, (image, (h, w)) in enumerate(zip(images, sizes)):
        expected = torch.zeros(height, width, dtype=torch.bool)
        expected[:h, :w] = True
        assert torch.equal(mask[i], expected)
        assert torch.equal(batch[i, :, :h, :w], image)
        assert not batch[i][:, ~expected].any()                     # padding is zero


# ---- metrics -----------------------------------------------------------------------------------------

WORDS = ["red", "blue", "cat", "dog", "yes"]  # no digits or articles: normalisation leaves them alone


@PROPERTY
@given(answers=st.lists(st.sampled_from(WORDS), min_size=10, max_size=10), prediction=st.sampled_from(WORDS),
       order=st.randoms(use_true_random=False))
def test_vqa_accuracy_is_the_soft_score_of_the_matches_in_any_order(answers, prediction, order):
    accuracy = metrics.vqa_question_accuracy(prediction, answers)
    shuffled = list(answers)
    order.shuffle(shuffled)
    # equal up to the float rounding of the official per-annotator sum, whose order follows the answers
    assert metrics.vqa_question_accuracy(prediction, shuffled) == pytest.approx(accuracy, abs=1e-12)
    assert accuracy == pytest.approx(metrics.vqa_soft_score(answers.count(prediction)), abs=1e-12)


def brute_force_vqa_accuracy(prediction, answers):
    """vqaEval.py's loop for one question written out literally, one annotator per string: clean the
    whitespace; if the answers differ, normalise them and the prediction; then for each annotator left
    out, min(1, the other annotators equal to the prediction / 3), averaged."""
    clean = lambda text: text.replace("\n", " ").replace("\t", " ").strip()  # noqa: E731
    gts, pred = [clean(a) for a in answers], clean(prediction)
    if len(set(gts)) > 1:
        gts, pred = [metrics.normalize_vqa_answer(a) for a in gts], metrics.normalize_vqa_answer(pred)
    accs = [min(1, sum(other == pred for other in gts[:i] + gts[i + 1:]) / 3) for i in range(len(gts))]
    return sum(accs) / len(accs)


# Few distinct strings, with case, punctuation, article and whitespace variants, so that predictions
# often match some annotators (a matching-free draw would score 0 whatever the code does).
VARIANT = st.text(alphabet="aAb ,.-\t\n", max_size=5) | st.sampled_from(["yes", "Yes.", " the  yes", "two", "2", "a 2"])


@PROPERTY
@given(data=st.data(), order=st.randoms(use_true_random=False))
def test_vqa_accuracy_of_any_strings_is_the_brute_force_leave_one_out_in_any_order(data, order):
    pool = data.draw(st.lists(VARIANT | st.text(max_size=6), min_size=1, max_size=4))
    answers = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=10))
    prediction = data.draw(st.sampled_from(pool) | VARIANT)
    accuracy = metrics.vqa_question_accuracy(prediction, answers)
    assert accuracy == pytest.approx(brute_force_vqa_accuracy(prediction, answers), abs=1e-12)
    shuffled = list(answers)
    order.shuffle(shuffled)
    assert metrics.vqa_question_accuracy(prediction, shuffled) == pytest.approx(accuracy, abs=1e-12)
    assert 0.0 <= accuracy <= 1.0


@st.composite
def score_matrices(draw):
    """(scores (n_images, n_captions) with many ties, caption_image): every image has 1-3 captions."""
    captions_per_image = draw(st.lists(st.integers(1, 3), min_size=1, max_size=5))
    caption_image = [i for i, n in enumerate(captions_per_image) for _ in range(n)]
    order = draw(st.permutations(range(len(caption_image))))
    caption_image = [caption_image[j] for j in order]
    scores = draw(st.lists(st.lists(st.integers(0, 3), min_size=len(caption_image), max_size=len(caption_image)),
                           min_size=len(captions_per_image), max_size=len(captions_per_image)))
    return torch.tensor(scores, dtype=torch.float32), caption_image


def brute_force_recall(scores, caption_image, k):
    """R@k by the tie rule of pixel_bert.metrics (a ground truth ranks behind every equal wrong item)."""
    n_images, n_captions = scores.shape
    text_hits = 0
    for i in range(n_images):
        own = [c for c in range(n_captions) if caption_image[c] == i]
        best = max(scores[i, c] for c in own)
        text_hits += sum(1 for c in range(n_captions) if c not in own and scores[i, c] >= best) < k
    image_hits = 0
    for c in range(n_captions):
        g = caption_image[c]
        image_hits += sum(1 for i in range(n_images) if i != g and scores[i, c] >= scores[g, c]) < k
    return 100.0 * text_hits / n_images, 100.0 * image_hits / n_captions


@PROPERTY
@given(matrix=score_matrices())
def test_retrieval_recall_is_monotone_in_k_and_equals_brute_force_ranking(matrix):
    scores, caption_image = matrix
    ks = (1, 2, 3, 5)
    recall = metrics.retrieval_recall(scores, caption_image, ks)
    for k in ks:
        assert (recall[f"tr_r{k}"], recall[f"ir_r{k}"]) == brute_force_recall(scores, caption_image, k)
    for small, large in zip(ks, ks[1:]):
        assert recall[f"tr_r{small}"] <= recall[f"tr_r{large}"] and recall[f"ir_r{small}"] <= recall[f"ir_r{large}"]


@PROPERTY
@given(pairs_per_sentence=st.integers(1, 4),
       outcomes=st.lists(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=4, max_size=4),
                         min_size=1, max_size=6))
def test_nlvr2_metrics_are_the_brute_force_counts_and_consistency_never_exceeds_accuracy(pairs_per_sentence,
                                                                                      outcomes):
    """Accuracy and consistency equal their brute-force counts. Every sentence with the same number of image pairs (as in NLVR2's balanced splits): a sentence
    counts as consistent only when all its pairs are right, so consistency <= accuracy."""
    labels, predictions = {}, {}
    for sentence, pairs in enumerate(outcomes):
        for pair, (label, prediction) in enumerate(pairs[:pairs_per_sentence]):
            labels[f"dev-{sentence}-{pair}-0"] = label
            predictions[f"dev-{sentence}-{pair}-0"] = prediction
    result = metrics.nlvr2_metrics(predictions, labels)
    # brute force: a pair is right when its prediction is its label; a sentence when all its pairs are
    right = [[label == prediction for label, prediction in pairs[:pairs_per_sentence]] for pairs in outcomes]
    assert result["accuracy"] == pytest.approx(sum(map(sum, right)) / (len(outcomes) * pairs_per_sentence))
    assert result["consistency"] == pytest.approx(sum(map(all, right)) / len(outcomes))
    assert 0.0 <= result["consistency"] <= result["accuracy"] <= 1.0
    assert result["n_sentences"] == len(outcomes) and result["n"] == len(labels)


def test_nlvr2_consistency_can_exceed_accuracy_when_sentences_have_unequal_pairs():
    """Not a property in general: one right sentence with one pair and one wrong sentence with three
    pairs give accuracy 1/4 and consistency 1/2."""
    labels = {"dev-0-0-0": True, "dev-1-0-0": True, "dev-1-1-0": True, "dev-1-2-0": True}
    predictions = {"dev-0-0-0": True, "dev-1-0-0": False, "dev-1-1-0": False, "dev-1-2-0": False}
    result = metrics.nlvr2_metrics(predictions, labels)
    assert (result["accuracy"], result["consistency"]) == (0.25, 0.5)
