"""Host-side input pipelines: face sources, online degradations, the reference protocol and Grain batching.

Modules: `sources` (FFHQ-Ref CSV, identity folders, TFDS; decoding and bad-input handling),
`synthetic` (procedural identities for the CPU demo and the tests), `degrade` (Real-ESRGAN and
BSRGAN chains, presets `moderate` and `severe`), `references` (protocol and epoch plan),
`pipeline` (config section and `make_iterator`). The calibration and batching-cost scripts are in tools/.
"""
