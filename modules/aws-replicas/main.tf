# One EC2 instance per replica, keyed by its stable skyhedge ID. Spot replicas are one-time spot
# requests that terminate on interruption: skyhedge replaces them, AWS must not restart them.

locals {
  zones = toset([for r in values(var.replicas) : r.zone])
  # the VPC: given, else the given subnets' (checked to be one), else the region's default VPC
  vpc_id = (
    var.vpc_id != null ? var.vpc_id :
    var.subnet_ids != null ? data.aws_subnet.given[keys(var.subnet_ids)[0]].vpc_id : data.aws_vpc.default[0].id
  )
  # given subnets that are not where the spec says: another VPC, or another zone than their key
  subnet_vpcs = distinct([for s in values(data.aws_subnet.given) : s.vpc_id])
  misplaced_subnets = [
    for zone, s in data.aws_subnet.given : "${s.id} is in ${s.availability_zone_id}, not ${zone}"
    if s.availability_zone_id != zone
  ]
  subnet_for_zone = var.subnet_ids != null ? var.subnet_ids : {
    for zone, subnet in data.aws_subnet.zone : zone => subnet.id
  }
  # Each replica stays in the subnet it was launched in (skyhedge passes it back as subnet_id),
  # and so in its VPC; new replicas go to their zone's subnet. One security group per VPC in use:
  # replicas of a VPC the spec left keep theirs until they are gone (a security group serves one
  # VPC, and AWS refuses to move an instance's group to another VPC's).
  replica_subnet = {
    for id, r in var.replicas : id => (r.subnet_id != null ? r.subnet_id : lookup(local.subnet_for_zone, r.zone, null))
  }
  replica_vpc = { for id, s in local.replica_subnet : id => data.aws_subnet.replica[s].vpc_id }
  vpcs        = toset(concat([local.vpc_id], values(local.replica_vpc)))

  image_id = var.image_id != null ? var.image_id : nonsensitive(data.aws_ssm_parameter.image[0].value)
  tags = merge(var.tags, {
    "skyhedge:service" = var.service
    "ManagedBy"        = "skyhedge"
  }, var.deployment == null ? {} : { "skyhedge:deployment" = var.deployment })
}

data "aws_ssm_parameter" "image" {
  count = var.image_id == null ? 1 : 0
  name  = var.image_ssm_parameter
}

data "aws_vpc" "default" {
  count   = var.vpc_id == null && var.subnet_ids == null ? 1 : 0
  default = true
}

data "aws_subnet" "given" {
  for_each = var.subnet_ids != null ? var.subnet_ids : {}
  id       = each.value
}

# Zone IDs name the same physical zone in every account; subnets are looked up by the account's
# own name for it (an unknown ID finds no subnet: "no matching EC2 Subnet found").
data "aws_availability_zones" "region" {
  count                  = var.subnet_ids == null && length(local.zones) > 0 ? 1 : 0
  all_availability_zones = true
}

data "aws_subnet" "zone" {
  for_each = var.subnet_ids == null ? local.zones : toset([])

  vpc_id = local.vpc_id
  availability_zone = lookup(
    zipmap(data.aws_availability_zones.region[0].zone_ids, data.aws_availability_zones.region[0].names),
    each.key, "${each.key}-unknown"
  )
  default_for_az = true

  lifecycle {
    # a zone ID the account cannot use in this region (some accounts lack a region's oldest
    # zones, e.g. use1-az3): named, rather than "no matching EC2 Subnet found"
    precondition {
      condition     = contains(data.aws_availability_zones.region[0].zone_ids, each.key)
      error_message = "Zone ${each.key} is not available to this account in this region: leave it out (placement.exclude_zones) or give aws.subnets."
    }
  }
}

data "aws_subnet" "replica" {
  for_each = toset([for s in values(local.replica_subnet) : s if s != null])
  id       = each.key
}

resource "aws_security_group" "replicas" {
  for_each    = local.vpcs
  name_prefix = "skyhedge-${var.service}-"
  description = "skyhedge service ${var.service}: model server port"
  vpc_id      = each.key
  tags        = local.tags

  ingress {
    description = "model server"
    from_port   = var.port
    to_port     = var.port
    protocol    = "tcp"
    cidr_blocks = var.ingress_cidrs
  }

  egress {
    description = "all outbound (model downloads, package installs)"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }

  lifecycle {
    create_before_destroy = true

    # Caught here, before anything is created: AWS would refuse the replicas of another VPC's
    # subnets one by one, and a subnet of another zone would put replicas where skyhedge does
    # not watch for their preemption.
    precondition {
      condition     = length(local.subnet_vpcs) <= 1 && (var.vpc_id == null || alltrue([for v in local.subnet_vpcs : v == var.vpc_id]))
      error_message = "aws.subnets: the subnets of one region must be in one VPC, found ${join(", ", concat(local.subnet_vpcs, var.vpc_id == null ? [] : [var.vpc_id]))}."
    }
    precondition {
      condition     = length(local.misplaced_subnets) == 0
      error_message = "aws.subnets: ${join("; ", local.misplaced_subnets)}."
    }
  }
}

resource "aws_instance" "replica" {
  for_each = var.replicas

  ami                    = local.image_id
  instance_type          = var.instance_type
  subnet_id              = local.replica_subnet[each.key]
  vpc_security_group_ids = [aws_security_group.replicas[local.replica_vpc[each.key]].id]
  key_name               = var.key_name
  iam_instance_profile   = var.iam_instance_profile
  # null leaves it to the subnet; EC2 sets it at launch only (a change rolls replicas over)
  associate_public_ip_address = var.public_ip

  # The boot script is module code; the spec's values reach it only as base64 JSON (inert).
  user_data_base64 = base64encode(templatefile("${path.module}/user_data.sh.tftpl", {
    config = base64encode(jsonencode({
      replica_id = each.key
      service    = var.service
      port       = var.port
      command    = var.run.command
      image      = var.run.image
      setup      = var.run.setup
      env        = var.run.env
      gpu        = var.gpu
    }))
  }))

  dynamic "instance_market_options" {
    for_each = each.value.market == "spot" ? [each.key] : []
    content {
      market_type = "spot"
      spot_options {
        spot_instance_type             = "one-time"
        instance_interruption_behavior = "terminate"
      }
    }
  }

  root_block_device {
    volume_size           = var.disk_size
    volume_type           = "gp3"
    encrypted             = true
    delete_on_termination = true
  }

  metadata_options {
    http_tokens = "required"
  }

  tags = merge(local.tags, {
    "Name"                = "skyhedge-${var.service}-${each.key}"
    "skyhedge:replica"    = each.key
    "skyhedge:market"     = each.value.market
    "skyhedge:zone"       = each.value.zone
    "skyhedge:managed-by" = "terraform"
  })

  lifecycle {
    # A newer AMI behind the SSM parameter must not replace running replicas, and a spec change
    # (run, instance type) must not stop and restart them in place: skyhedge rolls new replicas
    # in one at a time and releases the outdated ones as their replacements become READY.
    # The same for the key pair, public IP and subnet: a replica keeps those it was launched with
    # (a changed aws.key_name or aws.public_ip rolls replicas over through their revision; a zone's new subnet rolls
    # over the replicas pinned to the old one, see local.replica_subnet).
    ignore_changes = [
      ami, user_data_base64, instance_type, key_name, subnet_id, associate_public_ip_address,
      # disk_size changes roll replicas over (revision); EC2 cannot shrink a volume in place
      root_block_device,
      # a replica's market never changes under its ID: a read-back of the spot options (which
      # depends on the spot request still being listed) must not replace a running replica
      instance_market_options,
    ]
  }
}
