"""What a trained IDM's latent actions are used for, below the stages: the latent labels of a dataset
(stage 2's targets), decoders from latent to true action (stages 3a and 3b) and the probe of how much
of the action the latent carries (stage 1)."""

from .decoders import accuracy, decoder_step, fit_decoder, load_decoder, probe, save_decoder
from .labels import idm_latents, window_labels
from .online import OnlineDecoder
from .probing import latent_probe

__all__ = ["OnlineDecoder", "accuracy", "decoder_step", "fit_decoder", "idm_latents", "latent_probe", "load_decoder",
           "probe", "save_decoder", "window_labels"]
