# One `terraform_data` per replica. Creating it starts the replica as a detached process (its own
# session, a pid file and a log file under runtime_dir); destroying it stops that process group.
#
# No shell ever sees a spec value: the launcher is started through `interpreter` (an argv list)
# with only the replica ID as an argument, and the replica's settings travel as one JSON document
# in an environment variable. Only `run.command` itself is given to /bin/sh, as the user wrote it.

locals {
  # -S: skip site-packages start-up work (a launch is one short Python process per replica);
  # PYTHONPATH names the directory holding skyhedge, so nothing else is needed. A tree rendered
  # to be applied elsewhere (`skyhedge render`, GitOps) names no interpreter (""): the machine
  # applying it starts the launcher with $SKYHEDGE_LAUNCHER_PYTHON, else the `python3` on its PATH
  # (a venv's, activated), which finds skyhedge in its site-packages. The shell sees a fixed
  # script: the ID comes in as $0.
  launcher = (var.launcher.python != ""
    ? tolist([var.launcher.python, "-S", "-m", "skyhedge.clouds.local.launcher", "start"])
    : tolist(["/bin/sh", "-c", "exec \"$${SKYHEDGE_LAUNCHER_PYTHON:-python3}\" -m skyhedge.clouds.local.launcher start \"$0\""])
  )
  # A relative path is relative to the root's own directory, so a committed tree names no
  # directory of the machine that rendered it and applies from any clone; resolved here, where
  # Terraform runs, the launcher and the state get an absolute one.
  runtime_dir = startswith(var.runtime_dir, "/") ? var.runtime_dir : abspath("${path.root}/${var.runtime_dir}")
  workdir     = startswith(var.run.workdir, "/") ? var.run.workdir : abspath("${path.root}/${var.run.workdir}")
}

resource "terraform_data" "replica" {
  for_each = var.replicas

  # What the replica was launched as. `run` is not here: a replica keeps the revision it was
  # launched with, and a spec change reaches the service through new replicas that skyhedge rolls
  # in one at a time (never all stopped at once). skyhedge never changes these for a replica ID
  # (a new zone, market, port or revision is a new ID), so they are kept as launched (below).
  triggers_replace = {
    zone     = each.value.zone
    market   = each.value.market
    port     = each.value.port
    revision = each.value.revision
  }

  lifecycle {
    # Never replace a running replica because this map changed shape: skyhedge releases before
    # 2026-11-28 launched replicas with {zone, market, port, command, setup, env}, and Terraform
    # replaced (stopped, then started) every replica of a state dir they wrote at the first apply
    # of a newer skyhedge, all at once: an outage (docs/controller.md, "Upgrading skyhedge").
    ignore_changes = [triggers_replace]
  }

  # What the destroy-time provisioner needs: it may only read `self`.
  input = {
    id          = each.key
    runtime_dir = local.runtime_dir
    python      = var.launcher.python
    pythonpath  = var.launcher.pythonpath
    grace       = var.stop_grace_seconds
  }

  provisioner "local-exec" {
    interpreter = local.launcher
    command     = each.key
    # no launcher named: PYTHONPATH is left as the machine applying the tree has it
    environment = merge(var.launcher.pythonpath == "" ? {} : { PYTHONPATH = var.launcher.pythonpath }, {
      SKYHEDGE_LOCAL_REPLICA = jsonencode({
        id            = each.key
        service       = var.service
        region        = var.region
        zone          = each.value.zone
        market        = each.value.market
        port          = each.value.port
        command       = var.run.command
        setup         = var.run.setup
        setup_timeout = var.run.setup_timeout
        env           = var.run.env
        workdir       = local.workdir
        runtime_dir   = local.runtime_dir
      })
    })
  }

  # Stop runs with site-packages (no -S): the PYTHONPATH recorded at launch may name a skyhedge
  # since uninstalled or moved (an upgrade, a wheel replaced by an editable install), and the
  # interpreter's own site-packages then still find the installed one. The interpreter recorded
  # at launch may be gone too (a venv replaced by one at another path), or never named (a tree
  # rendered to be applied elsewhere): then the one skyhedge runs under now
  # ($SKYHEDGE_LAUNCHER_PYTHON, which skyhedge sets for Terraform; else python3) stops it.
  # The shell sees a fixed script: the ID comes in as $0.
  provisioner "local-exec" {
    when = destroy
    interpreter = ((self.input.python == "" ? false : fileexists(self.input.python))
      ? tolist([self.input.python, "-m", "skyhedge.clouds.local.launcher", "stop"])
      : tolist(["/bin/sh", "-c", "exec \"$${SKYHEDGE_LAUNCHER_PYTHON:-python3}\" -m skyhedge.clouds.local.launcher stop \"$0\""])
    )
    command = self.input.id
    environment = merge(self.input.pythonpath == "" ? {} : { PYTHONPATH = self.input.pythonpath }, {
      SKYHEDGE_LOCAL_REPLICA = jsonencode({
        id          = self.input.id
        runtime_dir = self.input.runtime_dir
        grace       = self.input.grace
      })
    })
  }
}
