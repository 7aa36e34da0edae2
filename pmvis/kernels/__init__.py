"""Loss and mask kernels (torch reference paths and fused GPU paths)."""
