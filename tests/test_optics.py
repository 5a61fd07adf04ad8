import torch
from conftest import make_ctf

from pyro_svae.ctf import apply_ctf, ctf_2d
from pyro_svae.optics import CTF, GaussianPSF, ImageFilter, Optics, gaussian_psf_2d


def test_the_optics_apply_the_psf_then_each_images_ctf():
    optics = Optics(6, 6, psf_fwhm=1.5)
    ctf = make_ctf(3, pixel_size=3.0)
    images = torch.randn(3, 2, 6, 6)
    chain = optics.filters(ctf=ctf)
    assert [type(f) for f in chain] == [GaussianPSF, CTF]
    assert all(isinstance(f, ImageFilter) for f in chain)
    expected = apply_ctf(apply_ctf(images, gaussian_psf_2d(1.5, 6)), ctf_2d(ctf, 6))
    assert torch.equal(optics(images, ctf=ctf), expected)
    assert torch.equal(optics(images, ctf=ctf, blur=False), apply_ctf(images, ctf_2d(ctf, 6)))
    assert optics.filters(blur=False) == []
    assert Optics(6, 6).psf is None and Optics(6, 6)(images) is images  # no filter: the image as it is


def test_the_psf_transfer_follows_the_module_and_stays_importable_from_ctf():
    from pyro_svae import ctf

    psf = GaussianPSF(2.0, 8, 10).double()
    assert psf.transfer(torch.zeros(1, 8, 10)).shape == (8, 6)
    assert psf.transfer_function.dtype == torch.float64 and psf.fwhm == 2.0
    assert ctf.gaussian_psf_2d is gaussian_psf_2d
