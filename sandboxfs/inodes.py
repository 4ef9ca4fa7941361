"""The inode table: FUSE inode numbers, the names they stand for, lookup counts.

One inode stands for one path in the sandbox (as sshfs does without
`-o use_ino`): two hard links to one file are two inodes here. An inode
records its parent and its name, so a rename of a directory moves every inode
below it without touching them.
"""

from __future__ import annotations

import dataclasses
import posixpath

ROOT_INODE = 1


@dataclasses.dataclass(eq=False)
class Node:
    """One inode: where it is, how often the kernel looked it up, what is cached."""

    ino: int
    parent: "Node | None"
    name: str
    lookups: int = 0
    open_count: int = 0
    # Opens under way, not yet counted in open_count.
    opening: int = 0
    # How many names in the table have this node as parent.
    children: int = 0
    # The node's name was unlinked or replaced; operations on it fail with
    # ENOENT, and it stays in the table until the kernel sends FORGET for it.
    detached: bool = False
    # The hidden name that keeps a detached file readable while it is open
    # (see FilesystemCore._keep_open_file), None if it has none.
    hidden_path: str | None = None
    # Cached attributes (a backend Stat) and when they expire (trio time).
    attr: object = None
    attr_expiry: float = 0.0
    # (size, mtime_ns) of the data the kernel's page cache holds for it.
    cached_version: tuple[int, int] | None = None
    # Staged writes shared by every open handle of this inode.
    dirty: object = None


class InodeTable:
    """Inodes by number and by (parent inode, name)."""

    def __init__(self, root_path: str) -> None:
        self.root_path = root_path
        self.root = Node(ROOT_INODE, None, "", lookups=1)
        self._by_ino: dict[int, Node] = {ROOT_INODE: self.root}
        self._by_name: dict[tuple[int, str], Node] = {}
        self._next_ino = ROOT_INODE + 1

    def __len__(self) -> int:
        return len(self._by_ino)

    def get(self, ino: int) -> Node | None:
        return self._by_ino.get(ino)

    def child(self, parent: Node, name: str) -> Node | None:
        return self._by_name.get((parent.ino, name))

    def path(self, node: Node) -> str:
        """Return the sandbox path of a node."""
        names = []
        while node.parent is not None:
            names.append(node.name)
            node = node.parent
        if not names:
            return self.root_path
        return posixpath.join(self.root_path, *reversed(names))

    def child_path(self, parent: Node, name: str) -> str:
        return posixpath.join(self.path(parent), name)

    def relative_depth(self, node: Node) -> int:
        """Return how many directories lie between the mount root and `node`."""
        depth = 0
        while node.parent is not None:
            depth += 1
            node = node.parent
        return depth

    def add(self, parent: Node, name: str) -> Node:
        """Return the node for `name` in `parent`, creating it if needed."""
        node = self._by_name.get((parent.ino, name))
        if node is None:
            node = Node(self._next_ino, parent, name)
            self._next_ino += 1
            self._by_ino[node.ino] = node
            self._link(parent, name, node)
        return node

    def _link(self, parent: Node, name: str, node: Node) -> None:
        self._by_name[(parent.ino, name)] = node
        node.parent = parent
        node.name = name
        parent.children += 1

    def _unlink(self, parent: Node, name: str) -> Node | None:
        node = self._by_name.pop((parent.ino, name), None)
        if node is not None:
            parent.children -= 1
        return node

    def detach(self, parent: Node, name: str) -> None:
        """Forget the name `name` in `parent`; its node lives on until forgotten."""
        node = self._unlink(parent, name)
        if node is not None:
            node.detached = True
            self._maybe_drop(node)

    def move(self, old_parent: Node, old_name: str, new_parent: Node, new_name: str) -> None:
        """Record a rename: the node at the destination, if any, is detached."""
        node = self._unlink(old_parent, old_name)
        self.detach(new_parent, new_name)
        if node is not None:
            self._link(new_parent, new_name, node)
        self._maybe_drop(old_parent)

    def exchange(self, parent_a: Node, name_a: str, parent_b: Node, name_b: str) -> None:
        """Record an exchange of two names (renameat2 RENAME_EXCHANGE)."""
        node_a = self._unlink(parent_a, name_a)
        node_b = self._unlink(parent_b, name_b)
        if node_a is not None:
            self._link(parent_b, name_b, node_a)
        if node_b is not None:
            self._link(parent_a, name_a, node_b)

    def forget(self, ino: int, count: int) -> None:
        node = self._by_ino.get(ino)
        if node is None or node is self.root:
            return
        node.lookups = max(0, node.lookups - count)
        self._maybe_drop(node)

    def release(self, node: Node) -> None:
        """Record that one open handle of `node` was closed."""
        node.open_count -= 1
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        # A node stays while the kernel or an open handle refers to it, or
        # while it is the parent of such a node (its path is needed).
        if node is self.root or node.lookups > 0 or node.open_count > 0 or node.children > 0:
            return
        if self._by_ino.pop(node.ino, None) is None:
            return
        parent = node.parent
        if self._by_name.get((parent.ino, node.name)) is node:
            self._unlink(parent, node.name)
            self._maybe_drop(parent)
