"""Data modules: toy2d, digits, mnist, cifar10, image_folder, the data-free noise module and the
direct-distillation trajectories."""
