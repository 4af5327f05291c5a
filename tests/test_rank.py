"""PixelBertPredictor.rank: images for a caption and captions for an image, scored as `match` scores
pairs (pre-training checkpoint) or as the retrieval head does (retrieval checkpoint), with the CNN
run once per image. The models are the demo recipe's before any step (random weights: the tests
check the plumbing, not what a trained model ranks first). Their scores differ from pair to pair by
about 1e-3 and float rounding by about 1e-7: the tests compare at 1e-6 and check a spread of 1e-4."""
import pytest
import torch

from pixel_bert import synthetic, train
from pixel_bert.config import ModelConfig, config_from_dict
from pixel_bert.heads import PixelBertForRetrieval, PixelBertForVQA
from pixel_bert.inference import PixelBertPredictor
from pixel_bert.saved_model import read_checkpoint, save_model

TOLERANCE = 1e-6  # float32 rounding of a score near 0.4 is 3e-8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("rank")
    train.main(["--output-dir", str(out), "--resume", "none", "--max-steps", "0", "--synthetic-images", "64",
                "--synthetic-eval-images", "0"])
    return str(out / "model.pt")


def _checkpoint_of(model_class, task, checkpoint, path, **extra):
    """A checkpoint of ``task`` with the pre-training checkpoint's config and vocabulary, random weights."""
    ckpt = read_checkpoint(checkpoint)
    torch.manual_seed(1)
    model = model_class(config_from_dict(ModelConfig, ckpt["model_config"]))
    save_model(model, str(path), extra={"task": task, "vocab": ckpt["vocab"], **extra})
    return str(path)


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return PixelBertPredictor.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def world(predictor):
    return synthetic.SyntheticCaptions(8, 4242, predictor.config.image_short_side)


class CNNCounter:
    """Counts the backbone's calls and the images they carried."""

    def __init__(self, predictor):
        self.calls = self.images = 0
        self.handle = predictor.model.bert.visual_embedding.backbone.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        self.calls += 1
        self.images += inputs[0].shape[0]


def test_rank_images_for_a_text_equals_match_pair_by_pair(predictor, world, tmp_path):
    text = world.caption(3)
    images = [world.image(i) for i in range(6)]
    images[2] = str(tmp_path / "two.png")  # a path among PIL images
    world.image(2).save(images[2])
    counter = CNNCounter(predictor)
    try:
        ranked = predictor.rank(text, images, image_batch_size=4, pairs_per_batch=4)
    finally:
        counter.handle.remove()
    assert (counter.calls, counter.images) == (2, 6)  # 6 images in batches of 4: each image once
    expected = [predictor.match(image, text) for image in images]
    assert sorted(i for i, _ in ranked) == list(range(6))
    for index, score in ranked:
        assert score == pytest.approx(expected[index], abs=TOLERANCE)
    # best first by its own scores, which are match's to TOLERANCE, spread over far more than that
    assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    assert max(expected) - min(expected) > 100 * TOLERANCE
    assert predictor.rank(text, images, top_k=2) == ranked[:2]  # the same computation, cut


def test_rank_texts_for_an_image_runs_the_cnn_once(predictor, world, tmp_path):
    path = str(tmp_path / "one.png")
    world.image(1).save(path)
    texts = [world.caption(i) for i in range(7)] + ["a", "the small white triangle is left of the red circle"]
    counter = CNNCounter(predictor)
    try:
        ranked = predictor.rank(path, texts, pairs_per_batch=4)
    finally:
        counter.handle.remove()
    assert (counter.calls, counter.images) == (1, 1)
    expected = [predictor.match(path, t) for t in texts]
    assert sorted(i for i, _ in ranked) == list(range(len(texts)))
    for index, score in ranked:
        assert score == pytest.approx(expected[index], abs=TOLERANCE)
    assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    assert max(expected) - min(expected) > 100 * TOLERANCE
    top = predictor.rank(world.image(1), texts, top_k=3)  # a PIL image query: the same ranking
    assert [i for i, _ in top] == [i for i, _ in ranked[:3]]


def test_rank_with_a_retrieval_checkpoint_uses_its_head(checkpoint, world, tmp_path):
    p = PixelBertPredictor.from_checkpoint(_checkpoint_of(PixelBertForRetrieval, "retrieval", checkpoint,
                                                          tmp_path / "retrieval.pt"))
    text = world.caption(0)
    images = [world.image(i) for i in range(5)]
    ranked = p.rank(text, images)
    ids, mask = p._texts([text])
    expected = []
    with torch.no_grad():  # the head's raw score (no sigmoid) of each pair on its own, CNN included
        for image in images:
            pixels, pixel_mask, _ = p._images([image])
            expected.append(float(p.model(ids, mask, pixels, pixel_mask)))
    assert sorted(i for i, _ in ranked) == list(range(len(images)))
    for index, score in ranked:
        assert score == pytest.approx(expected[index], abs=TOLERANCE)
    assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    assert max(expected) - min(expected) > 100 * TOLERANCE


def test_rank_refuses_what_it_cannot_score(predictor, checkpoint, world, tmp_path):
    vqa = PixelBertPredictor.from_checkpoint(_checkpoint_of(
        PixelBertForVQA, "vqa", checkpoint, tmp_path / "vqa.pt",
        answers=[f"a{i}" for i in range(predictor.config.num_answers)]))
    with pytest.raises(ValueError, match="'vqa' checkpoint"):
        vqa.rank(world.caption(0), [world.image(0)])
    with pytest.raises(ValueError, match="none of the 2 candidates"):  # a caption and captions
        predictor.rank("a red circle", ["a green cross", "missing.png"])
    with pytest.raises(TypeError, match="one query"):
        predictor.rank([world.image(0)], ["a red circle"])
    with pytest.raises(ValueError, match="top_k"):
        predictor.rank(world.image(0), ["a red circle"], top_k=0)


def test_the_readme_example_ranks_the_matching_image_and_colour_first(trained_checkpoint):
    """The README's lines, on the demo recipe's trained model (tests/conftest.py: a seed and world
    outside the README's grid): the only red circle of the eight scenes is among the first two for
    "the circle is red" (the README's seed-0 model puts it first; the test model of seed 17 puts a
    yellow circle first, 0.887 against 0.874), and the two white captions lead for the white triangle."""
    path, _ = trained_checkpoint
    p = PixelBertPredictor.from_checkpoint(path)
    images = [synthetic.render(synthetic.scene_for(7, i, 64, max_shapes=1)) for i in range(8)]  # as the README
    shapes = [synthetic.scene_for(7, i, 64, max_shapes=1).shapes[0] for i in range(8)]
    assert [(s.colour, s.kind) for s in shapes].count(("red", "circle")) == 1 and shapes[7].colour == "red"
    assert (shapes[0].colour, shapes[0].kind) == ("white", "triangle")
    ranked = p.rank("the circle is red", images, top_k=3)
    assert 7 in [index for index, _ in ranked[:2]] and dict(ranked)[7] > 0.5, ranked  # seed 0's model: first
    ranked = p.rank(images[0], ["a red circle", "a white cross", "a white triangle", "a green triangle"], top_k=2)
    assert {index for index, _ in ranked} == {1, 2}, ranked
