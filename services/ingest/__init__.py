"""Getting instances durably into the spool and onto the queue: spool, dispatch, the C-STORE
listener, the folder watcher."""
