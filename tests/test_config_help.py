"""--help's list of config fields: every field of the default config, with the comment beside it."""
from sscell.config import default_config, flatten_config
from sscell.config_help import config_help, field_docs


def test_every_field_is_listed_with_its_default_and_the_comment_beside_it():
    docs = field_docs()
    assert set(docs) == set(flatten_config(default_config().to_dict()))
    assert docs["loss.lambd"][1] == "barlow_twins off-diagonal weight"  # the comment ending its line
    assert docs["eval.knn_method"][1].startswith("exact (blocked, JAX) | approximate")
    assert docs["model.dtype"][1].endswith("parameters stay float32")  # continued on the lines below
    assert docs["eval.tasks"][1].startswith("knn | linear_probe")  # the comment lines above
    assert docs["loss.aug_gauss_std"][1].startswith("contrastive views")  # above a block of uncommented lines
    assert docs["data.synthetic.n_genes"][1].startswith("a generated atlas")  # the nested section's
    text = config_help()
    assert "\n- eval.knn_k=5, eval.pca_components=64, eval.batch_size=1024: kNN neighbours" in text
    assert "\n- model.hidden=(512, 512, 256, 256), model.latent=64, model.activation='selu'" in text
