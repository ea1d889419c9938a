"""Image generation (`fg-image-generate`): a bootable image bundle from a Debian package list
(mmdebstrap) or an exported container image.

  build.py     the request, its checks, and the build from start to finish
  debian.py    mmdebstrap: argv, package pre-check, package cache
  oci.py       -from-oci: a container image tarball -> root tree (pxe.bundle's safe unpacking)
  pack.py      node side (init, agent, busybox), kernel + provisioning initramfs, squashfs
  progress.py  the progress display of long steps

The CLI is pxe/cli/fg_image_generate.py; the bundle format is pxe/bundle.py's.
"""
