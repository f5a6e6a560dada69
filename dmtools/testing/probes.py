"""Source snippets for start-up probes: code run with ``python -c`` in a fresh interpreter, whose
imports the tests then read from ``sys.modules``."""

#: Makes the probe see none of this host's devices, so what it imports does not depend on the host:
#: the device-mapper control node it checks and the sysfs directory the loop index lists are both
#: a path that does not exist, popped from ``sys.argv`` (a control node made mid-run by another test
#: or tool would load the kernel's side; a bound loop device would load ``dmtools.loop`` to read
#: its status). Needs ``sys`` imported first.
NO_HOST_DEVICES = """
import dmtools.linux
dmtools.linux.CONTROL_PATH = dmtools.linux.SYS_BLOCK = sys.argv.pop()
"""
