variable "service" {
  description = "The skyhedge service name; replica processes carry it in SKYHEDGE_SERVICE."
  type        = string

  validation {
    condition     = can(regex("^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$", var.service))
    error_message = "The service name must be lowercase letters, digits and '-', starting with a letter, at most 40 characters."
  }
}

variable "region" {
  description = "The local cloud region this root manages (a label only: every local zone is this machine)."
  type        = string
}

variable "replicas" {
  description = "Replicas keyed by their stable skyhedge ID (r-0001): zone, market (spot or on-demand), the TCP port the process listens on, and the spec revision it was launched with (a new revision never restarts it: skyhedge rolls replicas over one by one)."
  type = map(object({
    zone     = string
    market   = string
    port     = number
    revision = optional(string, "")
  }))

  validation {
    condition     = alltrue([for id in keys(var.replicas) : can(regex("^r-[0-9]{4,}$", id))])
    error_message = "Replica IDs must look like r-0001."
  }

  validation {
    condition     = alltrue([for r in values(var.replicas) : contains(["spot", "on-demand"], r.market)])
    error_message = "Each replica's market must be \"spot\" or \"on-demand\"."
  }

  validation {
    condition     = alltrue([for r in values(var.replicas) : r.port >= 1024 && r.port <= 65535 && floor(r.port) == r.port])
    error_message = "Each replica's port must be an integer in [1024, 65535]."
  }

  validation {
    condition     = length(distinct([for r in values(var.replicas) : r.port])) == length(var.replicas)
    error_message = "Two replicas cannot share a port."
  }

  validation {
    condition     = alltrue([for r in values(var.replicas) : can(regex("^[a-z0-9][a-z0-9-]*$", r.zone))])
    error_message = "Each replica's zone must be a local zone name such as local-a."
  }
}

variable "run" {
  description = "What each replica runs: `command` (run by /bin/sh -c with $PORT set), an optional `setup` run first (stopped, and the launch failed, after `setup_timeout` seconds when set), `env` added to the process environment, and `workdir` the directory both run in (absolute, or relative to the root's directory)."
  type = object({
    command       = string
    setup         = optional(string)
    setup_timeout = optional(number)
    env           = optional(map(string), {})
    workdir       = string
  })

  validation {
    condition     = length(trimspace(var.run.command)) > 0
    error_message = "run.command must not be empty."
  }
}

variable "runtime_dir" {
  description = "Directory holding the replicas' pid and log files (replicas/) and the zone capacity file (capacity.json): absolute, or relative to the root's directory."
  type        = string

  validation {
    condition     = length(trimspace(var.runtime_dir)) > 0
    error_message = "runtime_dir must name a directory."
  }
}

variable "launcher" {
  description = "The Python interpreter that runs skyhedge's replica launcher (with -S), and the directory holding the skyhedge package (its PYTHONPATH); both empty in a tree rendered to be applied elsewhere: then $SKYHEDGE_LAUNCHER_PYTHON, else the python3 on PATH, with its own site-packages."
  type = object({
    python     = string
    pythonpath = string
  })

  validation {
    condition     = var.launcher.pythonpath == "" || startswith(var.launcher.pythonpath, "/")
    error_message = "launcher.pythonpath must be the absolute directory holding the skyhedge package (or empty)."
  }
}

variable "stop_grace_seconds" {
  description = "On destroy, seconds between SIGTERM and SIGKILL for a replica's process group."
  type        = number
  default     = 10

  validation {
    condition     = var.stop_grace_seconds >= 0 && var.stop_grace_seconds <= 3600
    error_message = "stop_grace_seconds must be between 0 and 3600."
  }
}
