"""``DTISprites(compile=True)``: the encoder and the greedy selection compiled with
torch.compile decompose a batch as the eager model does."""

import pytest
import torch
from small_model import CONFIGS, randomise_heads

from dti_sprites.model import DTISprites


@pytest.mark.usefixtures("one_thread")
def test_the_compiled_model_decomposes_as_the_eager_one():
    config = {**CONFIGS["multidsprites"], "encoder": "resnet8", "n_layers": 2, "greedy_passes": 1}
    torch.manual_seed(0)
    eager = DTISprites(**config).eval()
    randomise_heads(eager)
    compiled = DTISprites(**config, compile=True).eval()
    compiled.load_state_dict(eager.state_dict())  # the same keys: compiled in place
    x = torch.rand(6, 3, eager.image_size, eager.image_size)
    with torch.no_grad():
        a, b = eager(x), compiled(x)
    assert torch.equal(a.sprite_choice, b.sprite_choice)
    assert torch.equal(a.background_choice, b.background_choice)
    torch.testing.assert_close(b.reconstruction, a.reconstruction, atol=1e-5, rtol=1e-5)
