"""graphengine's built-in plugins, registered through the ``graphengine`` entry-point group
exactly like a third-party package's."""
