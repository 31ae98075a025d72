"""The tiny trained text-to-video model the demo and the fidelity benchmark run on (needs diffusers)."""
