"""Test hosts: network namespaces on shaped veth links, a link emulator relay, ``splitnet lab``."""

from splitnet.lab.netns import Lab, LabError, LinkSpec, check_root, destroy, lab_topology

__all__ = ["Lab", "LabError", "LinkSpec", "check_root", "destroy", "lab_topology"]
