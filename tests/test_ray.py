"""--engine ray on a local Ray cluster gives the same annotations as the local engine (skipped without Ray)."""

import pytest

ray = pytest.importorskip("ray")

from segfromxai.run.ray import run_ray  # noqa: E402
from segfromxai.models.model import load_model  # noqa: E402
from segfromxai.run.local import run  # noqa: E402
from segfromxai.recipe.recipe import load_recipe  # noqa: E402
from segfromxai.quality.synth import write_synth  # noqa: E402

from test_scale import content  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    yield
    ray.shutdown()


def test_ray_engine_equals_the_local_engine_on_64_images(tmp_path, tiny_card, cluster):
    images = write_synth(tmp_path / "synth", 64, seed=5, size=48) / "images"
    model = load_model(checkpoint=tiny_card)
    recipe = load_recipe("default")
    local = run(recipe, images, tmp_path / "local", model=model, batch_size=8)
    summary = run_ray(recipe, images, tmp_path / "ray", model=model, batch_size=8,
                      model_args={"checkpoint": tiny_card}, cpus_per_actor=0.5)
    assert summary["engine"] == "ray" and summary["counts"] == local["counts"]
    assert content(tmp_path / "ray") == content(tmp_path / "local")
    # a sharded Ray run resumes with the local engine: nothing is redone
    again = run(recipe, images, tmp_path / "ray", model=model, batch_size=8, resume=True)
    assert again["processed_now"] == 0
