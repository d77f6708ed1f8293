timeout 400 /work/main/.tox/verbs/bin/python tests/rxe/qemu_check.py round-trip 10.0.2.15; echo rc=$?
