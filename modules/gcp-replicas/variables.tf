variable "service" {
  description = "The skyhedge service name: part of every instance name and the skyhedge-service label."
  type        = string

  validation {
    condition     = can(regex("^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$", var.service))
    error_message = "The service name must be lowercase letters, digits and '-', starting with a letter, at most 40 characters."
  }
}

variable "project" {
  description = "The GCP project; null uses the provider's default (GOOGLE_PROJECT / gcloud config)."
  type        = string
  default     = null
}

variable "region" {
  description = "The GCP region of this root; every replica's zone must be in it."
  type        = string

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]+$", var.region))
    error_message = "region must be a GCP region name such as us-central1."
  }
}

variable "machine_type" {
  description = "The machine type of every replica (e.g. g2-standard-4; n1 types get their GPUs from `accelerator`)."
  type        = string
}

variable "accelerator" {
  description = "GPUs to attach (n1 machine types only: a2/g2/a3 types carry theirs), e.g. {type = \"nvidia-tesla-t4\", count = 1}; null for none."
  type = object({
    type  = string
    count = number
  })
  default = null

  validation {
    condition     = var.accelerator == null ? true : var.accelerator.count >= 1
    error_message = "accelerator.count must be at least 1."
  }
}

variable "gpu" {
  description = "Whether replicas have GPUs (they then stop, not migrate, on host maintenance)."
  type        = bool
  default     = true
}

variable "replicas" {
  description = "Replicas keyed by their stable skyhedge ID (r-0001): zone and market (spot or on-demand)."
  type = map(object({
    zone   = string
    market = string
  }))

  validation {
    condition     = alltrue([for id in keys(var.replicas) : can(regex("^r-[0-9]{4,}$", id))])
    error_message = "Replica IDs must look like r-0001."
  }

  validation {
    condition     = alltrue([for r in values(var.replicas) : contains(["spot", "on-demand"], r.market)])
    error_message = "Each replica's market must be \"spot\" or \"on-demand\"."
  }
}

variable "run" {
  description = "What each replica runs at boot: `command` (bash), or `image` (a container run with Docker, `command` as its arguments), an optional `setup` run first, and `env`."
  type = object({
    command = optional(string)
    image   = optional(string)
    setup   = optional(string)
    env     = optional(map(string), {})
  })

  validation {
    condition     = var.run.command != null || var.run.image != null
    error_message = "run needs a command or an image."
  }
}

variable "port" {
  description = "The TCP port the model server listens on (opened by the firewall rule; $PORT at boot)."
  type        = number

  validation {
    condition     = var.port >= 1 && var.port <= 65535 && floor(var.port) == var.port
    error_message = "port must be an integer in [1, 65535]."
  }
}

variable "disk_size" {
  description = "Boot disk size in GB."
  type        = number
  default     = 100

  validation {
    condition     = var.disk_size >= 10 && var.disk_size <= 65536 && floor(var.disk_size) == var.disk_size
    error_message = "disk_size must be a whole number of GB between 10 and 65536."
  }
}

variable "image" {
  description = "The boot image of every replica; null uses a Deep Learning VM image family with CUDA drivers."
  type        = string
  default     = null
}

variable "network" {
  description = "The VPC network of the replicas and their firewall rule (a name or a link)."
  type        = string
  default     = "default"
  nullable    = false
}

variable "subnetwork" {
  description = "The subnetwork of this region to launch into (null: the network's own, auto mode only)."
  type        = string
  default     = null
}

variable "ingress_cidrs" {
  description = "Source ranges allowed to reach the model server port (the router must be among them)."
  type        = list(string)
  default     = ["0.0.0.0/0"]

  validation {
    condition     = length(var.ingress_cidrs) > 0 && alltrue([for c in var.ingress_cidrs : can(cidrhost(c, 0))])
    error_message = "ingress_cidrs must be at least one CIDR block such as 10.0.0.0/8 (the router must reach the replicas)."
  }
}

variable "deployment" {
  description = "The skyhedge state (deployment) these replicas belong to, labelled skyhedge-deployment: skyhedge deletes instances carrying its own label that its Terraform state never saved (an apply killed mid-create), which would otherwise hold their replica's instance name. null (a GitOps render): no label."
  type        = string
  default     = null

  validation {
    # a GCP label value: at most 63 lowercase letters, digits, '_' or '-'
    condition     = var.deployment == null || can(regex("^[a-z0-9]{8,63}$", var.deployment))
    error_message = "deployment: 8-63 lowercase letters and digits, or null."
  }
}

variable "labels" {
  description = "Extra labels on every instance (skyhedge's own labels win on conflicts)."
  type        = map(string)
  default     = {}
}

variable "private_endpoint" {
  description = "Endpoints use the internal IP (the router is inside the VPC network or a peered one); false: the external IP when there is one."
  type        = bool
  default     = false
}

variable "external_ip" {
  description = "Whether each replica gets an ephemeral external IP. false: internal IP only (an organisation policy may forbid external IPs); boot-time downloads then need Cloud NAT, and the router must reach the internal IPs."
  type        = bool
  default     = true
}

variable "nic_type" {
  description = "The network interface type: GVNIC for the machine series that require it (A3, A4, G4); null for the default (VirtIO)."
  type        = string
  default     = null

  validation {
    condition     = var.nic_type == null ? true : contains(["GVNIC", "VIRTIO_NET"], var.nic_type)
    error_message = "nic_type must be GVNIC, VIRTIO_NET or null."
  }
}

variable "boot_disk_type" {
  description = "The boot disk type: hyperdisk-balanced for the machine series that take Hyperdisk only (A3 Ultra, A4, G4), else pd-balanced."
  type        = string
  default     = "pd-balanced"
}
