variable "service" {
  description = "The skyhedge service name: part of every resource name and the skyhedge:service tag."
  type        = string

  validation {
    condition     = can(regex("^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$", var.service))
    error_message = "The service name must be lowercase letters, digits and '-', starting with a letter, at most 40 characters."
  }
}

variable "region" {
  description = "The AWS region of this root; every replica's zone must be one of its zone IDs."
  type        = string

  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]+$", var.region))
    error_message = "region must be an AWS region name such as us-east-1."
  }
}

variable "instance_type" {
  description = "The EC2 instance type of every replica (e.g. g6.xlarge)."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9-]+\\.[a-z0-9-]+$", var.instance_type))
    error_message = "instance_type must look like g6.xlarge."
  }
}

variable "replicas" {
  description = "Replicas keyed by their stable skyhedge ID (r-0001): the availability zone ID (e.g. use1-az1, the same zone in every account), the market, and for a launched replica the subnet it runs in (null: its zone's subnet)."
  type = map(object({
    zone      = string
    market    = string
    subnet_id = optional(string)
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
    condition     = alltrue([for r in values(var.replicas) : can(regex("^[a-z0-9]+-az[0-9]+$", r.zone))])
    error_message = "Each replica's zone must be an availability zone ID such as use1-az1."
  }
}

variable "gpu" {
  description = "Whether replicas have NVIDIA GPUs (a container then gets them with --gpus all)."
  type        = bool
  default     = true
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
  description = "The TCP port the model server listens on (opened in the security group; $PORT at boot)."
  type        = number

  validation {
    condition     = var.port >= 1 && var.port <= 65535 && floor(var.port) == var.port
    error_message = "port must be an integer in [1, 65535]."
  }
}

variable "disk_size" {
  description = "Root volume size in GiB (gp3, encrypted)."
  type        = number
  default     = 100

  validation {
    condition     = var.disk_size >= 10 && var.disk_size <= 65536 && floor(var.disk_size) == var.disk_size
    error_message = "disk_size must be a whole number of GiB between 10 and 65536."
  }
}

variable "image_id" {
  description = "The AMI of every replica; null looks up image_ssm_parameter (a GPU Deep Learning AMI by default)."
  type        = string
  default     = null
}

variable "image_ssm_parameter" {
  description = "The public SSM parameter naming the AMI to use when image_id is null."
  type        = string
  default     = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
}

variable "ingress_cidrs" {
  description = "CIDR blocks allowed to reach the model server port (the router must be among them)."
  type        = list(string)
  default     = ["0.0.0.0/0"]

  validation {
    condition     = length(var.ingress_cidrs) > 0 && alltrue([for c in var.ingress_cidrs : can(cidrhost(c, 0))])
    error_message = "ingress_cidrs must be at least one CIDR block such as 10.0.0.0/8 (the router must reach the replicas)."
  }
}

variable "private_endpoint" {
  description = "Endpoints use the private IP (the router is inside the VPC or a peered network); false: the public IP when there is one."
  type        = bool
  default     = false
}

variable "public_ip" {
  description = "Whether replicas get a public IPv4 address; null: as their subnet's map_public_ip_on_launch sets it. false keeps them off the internet (the router must then reach their private IPs)."
  type        = bool
  default     = null
}

variable "vpc_id" {
  description = "The VPC to launch into; null uses the region's default VPC."
  type        = string
  default     = null
}

variable "subnet_ids" {
  description = "Subnet per availability zone ID; null uses each zone's default subnet."
  type        = map(string)
  default     = null
}

variable "key_name" {
  description = "An EC2 key pair name for SSH access, or null for none."
  type        = string
  default     = null
}

variable "iam_instance_profile" {
  description = "An IAM instance profile name for the replicas, or null for none."
  type        = string
  default     = null
}

variable "deployment" {
  description = "The skyhedge state (deployment) these replicas belong to, tagged skyhedge:deployment: skyhedge terminates instances carrying its own tag that its Terraform state never saved (an apply killed mid-create). null (a GitOps render): no tag."
  type        = string
  default     = null

  validation {
    condition     = var.deployment == null || can(regex("^[a-z0-9]{8,64}$", var.deployment))
    error_message = "deployment: 8-64 lowercase letters and digits, or null."
  }
}

variable "tags" {
  description = "Extra tags on every resource (skyhedge's own tags win on conflicts)."
  type        = map(string)
  default     = {}
}
