"""The parameter model: presets resolve completely, explicit values win, errors name the field."""

import pytest

from nst.errors import ParamsError
from nst.params import PRESETS, StyleParams, resolve_params


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_resolves_to_a_complete_valid_parameter_set(name: str) -> None:
    params = resolve_params({"preset": name})
    dumped = params.model_dump()
    assert set(dumped) == set(StyleParams.model_fields)
    for key, value in PRESETS[name].items():
        assert dumped[key] == value


def test_preset_values_match_the_design() -> None:
    gatys = resolve_params({"preset": "gatys"})
    assert (gatys.optimizer, gatys.init, gatys.iterations, gatys.normalization) == ("lbfgs", "noise", 500, "gatys")
    assert gatys.content_weight / gatys.style_weight == pytest.approx(1e-3)
    tf = resolve_params({"preset": "tf-keras"})
    assert (tf.optimizer, tf.lr, tf.adam_beta1, tf.adam_eps, tf.iterations) == ("adam", 5.0, 0.99, 0.1, 1000)
    deep = resolve_params({"preset": "deep-style"})
    assert deep.content_layers == ["block5_conv4"] and deep.style_layers[2] == "block3_conv4"
    same = {k for k in StyleParams.model_fields if k not in ("preset", "content_layers", "style_layers")}
    assert {k: getattr(deep, k) for k in same} == {k: getattr(tf, k) for k in same}
    vgg16 = resolve_params({"preset": "vgg16"})
    assert (vgg16.network, vgg16.size, vgg16.style_size, vgg16.lr) == ("vgg16", 384, 256, 0.01)


def test_explicit_values_beat_the_preset_and_later_layers_beat_earlier() -> None:
    params = resolve_params({"preset": "gatys", "size": 256}, {"iterations": 7, "size": None})
    assert (params.size, params.iterations, params.init) == (256, 7, "noise")


def test_errors_name_context_and_field() -> None:
    with pytest.raises(ParamsError) as exc:
        resolve_params({"size": 0, "bogus": 1}, context="pairs[2]")
    message = str(exc.value)
    assert "pairs[2].size" in message and "pairs[2].bogus: unknown parameter" in message


def test_preserve_colors_true_means_luminance() -> None:
    assert resolve_params({"preserve_colors": True}).preserve_colors == "luminance"
    assert resolve_params({"preserve_colors": False}).preserve_colors == "none"


def test_per_pair_weights_do_not_split_batches_but_graph_parameters_do() -> None:
    base = resolve_params({})
    assert resolve_params({"style_weight": 99, "seed": 3, "init": "noise"}).graph_key() == base.graph_key()
    assert resolve_params({"size": 64}).graph_key() != base.graph_key()
    assert resolve_params({"optimizer": "adam"}).graph_key() != base.graph_key()


def test_adding_a_parameter_is_a_one_place_edit() -> None:
    """A new field with its Role marker joins the batch key, the network key and the idempotency check by itself."""
    from typing import Annotated

    from pydantic import Field

    from nst.params import Role

    class Extended(StyleParams):
        blur: Annotated[int, Role.GRAPH | Role.NETWORK] = Field(0, description="a new graph-changing parameter")
        note: Annotated[str, Role.NOT_RESULT] = Field("", description="a parameter that cannot change the image")
        tint: float = Field(0.0, description="a new result-only parameter")

    base = Extended()
    assert Extended(blur=1).graph_key() != base.graph_key()
    assert Extended(blur=1).network_key() != base.network_key()
    assert Extended(tint=0.5).graph_key() == base.graph_key() and Extended(note="x").graph_key() == base.graph_key()
    assert "blur" in base.result_values() and "tint" in base.result_values() and "note" not in base.result_values()


def test_roles_of_the_existing_parameters() -> None:
    from nst.params import Role, fields_with

    assert fields_with(StyleParams, Role.NOT_RESULT) == ("device", "save_every", "log_every", "max_input_pixels")
    assert set(fields_with(StyleParams, Role.NETWORK)) == {
        "network",
        "content_layers",
        "style_layers",
        "pooling",
        "post_relu",
        "weights",
        "device",
    }
    assert resolve_params({"tv_weight": 1.0}).graph_key() != resolve_params({"tv_weight": 0.0}).graph_key()
    assert resolve_params({"tv_weight": 1.0}).graph_key() == resolve_params({"tv_weight": 2.0}).graph_key()
