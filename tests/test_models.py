"""The networks: shapes, sizes, gradient paths, and that stage 1's objective can be optimised."""

import pytest
import torch

from lapo_fast.models import ActionDecoder, ImpalaEncoder, LatentActionModel, LatentIDM, LatentPolicy, UNetFDM


def test_impala_shapes_and_channels_last_agree():
    torch.manual_seed(0)
    enc = ImpalaEncoder(9, scale=1)
    x = torch.randn(3, 9, 64, 64)
    y = enc(x)
    assert y.shape == (3, 256) and (y >= 0).all()
    y_cl = enc.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(y_cl, y, rtol=1e-4, atol=1e-5)


def test_fdm_size_range_and_dependence_on_the_action():
    params = sum(p.numel() for p in UNetFDM(6, 128, width=24).parameters())
    assert 7e6 < params < 9.5e6  # the paper's ~8M at base width 24
    for width in (5, 12, 20):  # any width builds
        UNetFDM(6, 128, width=width)(torch.zeros(1, 6, 64, 64), torch.zeros(1, 128))
    for norm in ("group", "batch"):
        torch.manual_seed(0)
        fdm = UNetFDM(6, 128, width=8, norm=norm).eval()
        frames = torch.rand(2, 6, 64, 64) - 0.5
        a = fdm(frames, torch.randn(2, 128))
        b = fdm(frames, torch.randn(2, 128))
        assert a.shape == (2, 3, 64, 64) and a.abs().max() <= 0.5
        assert not torch.allclose(a, b), f"the prediction must depend on the latent action ({norm})"
    with pytest.raises(ValueError, match="norm"):
        UNetFDM(6, 128, width=8, norm="layer")


def test_idm_checks_its_latent_layout():
    with pytest.raises(ValueError, match="latent_dim"):
        LatentIDM(latent_dim=100)


@pytest.mark.parametrize("fdm_arch, drop", [("unet", 0.6), ("lapo", 0.85)])
def test_stage1_gradients_flow_and_loss_goes_down(fdm_arch, drop):
    torch.manual_seed(0)
    lam = LatentActionModel(impala_scale=1, fdm_width=8, fdm_arch=fdm_arch)
    window = torch.rand(8, 3, 3, 64, 64) - 0.5
    window[:, 2] = window[:, 1].roll(1, dims=-1)  # a learnable world: o_{t+1} is o_t shifted by a pixel
    opt = torch.optim.Adam(lam.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss, recon, out, pred = lam(window)
        opt.zero_grad()
        loss.backward()
        losses.append(recon.item())
        opt.step()
    assert out.latent.shape == (8, 128) and out.indices.shape == (8, 2, 4)
    assert lam.idm.head.weight.grad is not None and lam.idm.head.weight.grad.abs().sum() > 0  # straight-through
    assert all(not p.requires_grad for p in lam.idm.vq.buffers())  # codebooks learn by EMA only
    assert losses[-1] < drop * losses[0]


def test_policy_and_decoder_shapes():
    pi = LatentPolicy(impala_scale=1)
    obs = torch.rand(5, 3, 64, 64) - 0.5
    assert pi(obs).shape == (5, 128)
    logits, value = pi.act_value(pi.features(obs))
    assert logits.shape == (5, 15) and value.shape == (5,)
    assert ActionDecoder()(torch.randn(5, 128)).shape == (5, 15)
