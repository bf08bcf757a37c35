# One Compute Engine instance per replica, keyed by its stable skyhedge ID. Spot replicas use the
# SPOT provisioning model and are deleted (not stopped) on preemption: skyhedge replaces them.

locals {
  image = var.image != null ? var.image : "projects/deeplearning-platform-release/global/images/family/common-cu124-ubuntu-2204-py310"
  tag   = "skyhedge-${var.service}"
  # A network named by its link (a shared VPC) lives in its host project, and so must the firewall
  # rule opening the port on it; a subnetwork named plainly is then looked up there too.
  network_project = can(regex("^projects/([^/]+)/", var.network)) ? regex("^projects/([^/]+)/", var.network)[0] : var.project
  # GCE names are at most 63 characters: a long service and region name gets a hashed tail
  firewall_full = "skyhedge-${var.service}-${var.region}"
  firewall_name = length(local.firewall_full) <= 63 ? local.firewall_full : "${substr(local.firewall_full, 0, 54)}-${substr(sha1(local.firewall_full), 0, 8)}"
  # GPUs attached (n1) or built in (a2, a3, a4, g2, g4): such VMs cannot live-migrate
  gpu = var.gpu || var.accelerator != null || can(regex("^(a2|a3|a4|g2|g4)-", var.machine_type))
  labels = merge(var.labels, {
    "skyhedge-service" = var.service
    "managed-by"       = "skyhedge"
  }, var.deployment == null ? {} : { "skyhedge-deployment" = var.deployment })
}

resource "google_compute_firewall" "replicas" {
  project       = local.network_project
  name          = local.firewall_name
  network       = var.network
  description   = "skyhedge: model server port of the replicas"
  direction     = "INGRESS"
  source_ranges = var.ingress_cidrs
  target_tags   = [local.tag]

  allow {
    protocol = "tcp"
    ports    = [tostring(var.port)]
  }
}

resource "google_compute_instance" "replica" {
  for_each = var.replicas

  project      = var.project
  name         = "skyhedge-${var.service}-${each.key}"
  zone         = each.value.zone
  machine_type = var.machine_type
  tags         = [local.tag]

  labels = merge(local.labels, {
    "skyhedge-replica" = each.key
    "skyhedge-market"  = each.value.market
  })

  boot_disk {
    auto_delete = true
    initialize_params {
      image = local.image
      size  = var.disk_size
      type  = var.boot_disk_type
    }
  }

  network_interface {
    nic_type           = var.nic_type
    network            = var.network
    subnetwork         = var.subnetwork
    subnetwork_project = var.subnetwork != null && !can(regex("^projects/", coalesce(var.subnetwork, "-"))) ? local.network_project : null
    # an ephemeral external IP, unless the spec keeps replicas internal (gcp.external_ip)
    dynamic "access_config" {
      for_each = var.external_ip ? [1] : []
      content {}
    }
  }

  dynamic "guest_accelerator" {
    for_each = var.accelerator == null ? [] : [var.accelerator]
    content {
      type  = guest_accelerator.value.type
      count = guest_accelerator.value.count
    }
  }

  # The boot script is module code; the spec's values reach it only as base64 JSON (inert).
  # Deep Learning VM images install the NVIDIA driver at first boot only when asked to.
  metadata = merge(local.gpu ? { install-nvidia-driver = "True" } : {}, {
    startup-script = templatefile("${path.module}/startup.sh.tftpl", {
      config = base64encode(jsonencode({
        replica_id = each.key
        service    = var.service
        port       = var.port
        command    = var.run.command
        image      = var.run.image
        setup      = var.run.setup
        env        = var.run.env
        gpu        = local.gpu
      }))
    })
  })

  dynamic "scheduling" {
    for_each = each.value.market == "spot" ? [each.key] : []
    content {
      provisioning_model          = "SPOT"
      preemptible                 = true
      automatic_restart           = false
      instance_termination_action = "DELETE"
      on_host_maintenance         = "TERMINATE"
    }
  }

  dynamic "scheduling" {
    for_each = each.value.market == "spot" ? [] : [each.key]
    content {
      provisioning_model  = "STANDARD"
      preemptible         = false
      automatic_restart   = true
      on_host_maintenance = local.gpu ? "TERMINATE" : "MIGRATE"
    }
  }

  lifecycle {
    # (A precondition, not a variable validation: those may refer to other variables only since
    # Terraform 1.9, and the module supports 1.5.)
    precondition {
      condition     = startswith(each.value.zone, "${var.region}-")
      error_message = "Replica ${each.key}'s zone ${each.value.zone} is not in the root's region ${var.region}."
    }

    # A newer image in the family must not replace running replicas, and a spec change (run,
    # machine type, accelerator, disk) must not replace or restart them all at once: skyhedge
    # rolls new replicas in one at a time and releases the outdated ones as their replacements
    # become READY.
    ignore_changes = [
      boot_disk[0].initialize_params[0].image,
      boot_disk[0].initialize_params[0].size,
      boot_disk[0].initialize_params[0].type,
      metadata,
      machine_type,
      guest_accelerator,
      # a replica keeps the subnetwork it was launched in (a region's new subnetwork is where its
      # next replicas go; moving a running VM needs it stopped)
      network_interface[0].subnetwork,
      network_interface[0].subnetwork_project,
      # a changed gcp.external_ip rolls replicas over (revision) rather than editing them all
      network_interface[0].access_config,
      # set by the machine series (render.py): a new series rolls the replicas over (revision)
      network_interface[0].nic_type,
    ]
  }
}
