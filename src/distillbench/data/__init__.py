"""Data modules: toy2d, digits, mnist, cifar10, image_folder and the data-free noise module."""
