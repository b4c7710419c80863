"""tunnelctl: the thin control client of tunneld.

It imports the standard library, ``tunneld.wire``, ``tunneld.paths`` and ``tunneld.sshconfig``
only (no asyncio, asyncssh, pydantic or uvloop: a test runs every verb and checks), so it
starts fast.  One module, one job:

    __main__    main(): parse, run the verb, the exit status
    cli         the argparse definition of the verbs, the exit statuses
    commands    one function per verb: its request, then what it prints
    client      the daemon's socket, starting the daemon, the one request loop
    prompt      login prompts asked on /dev/tty
    render      tables, sizes, ages; the text of list, sessions, status and events
    completion  shell completion scripts, and the names they complete
    daemonlog   `logs --daemon`: the daemon's log file, read directly
    service     `service install|uninstall|status`: systemd or launchd
    sshsetup    `ssh-config`'s texts: ~/.ssh/tunneld.conf, the Include line (pure)
    sshinstall  `ssh-config [--install|--uninstall]`: the hosts, the files, what is said
    watch       `watch` and `ssh`: a stream copied unchanged, its markers opened
"""
