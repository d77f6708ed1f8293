"""QEMU's migration stream, sans IO: what a QEMU source writes into its migration
channel and a QEMU destination reads (``migration/savevm.c`` and ``migration/ram.c``
of QEMU), and the conversion between that stream and a migration image.

- :mod:`.stream`: the stream's framing – header, configuration, section headers and
  footers, EOF and the VM description; the device state kept as opaque bytes.
- :mod:`.ram`: the ``ram`` section's records – the setup block list, ZERO, PAGE,
  CONTINUE, EOS and HOOK – decoded and encoded with numpy, runs at a time.
- :mod:`.convert`: a saved stream into a migration image and back.
"""
