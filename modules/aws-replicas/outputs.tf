output "replicas" {
  description = "Per replica ID: endpoint (http://IP:PORT: the private IP when ingress is private only, else the public IP when there is one), cloud_id (instance ID), private_ip, public_ip, zone (zone ID), availability_zone (name) and market."
  value = {
    for id, inst in aws_instance.replica : id => {
      endpoint          = try("http://${var.private_endpoint ? inst.private_ip : coalesce(inst.public_ip, inst.private_ip)}:${var.port}", null)
      cloud_id          = try(inst.id, null)
      private_ip        = try(inst.private_ip, null)
      public_ip         = try(inst.public_ip, null)
      zone              = try(var.replicas[id].zone, null)
      availability_zone = try(inst.availability_zone, null)
      # the subnet, when the spec chose it (aws.subnets) or pinned it: a replica on its zone's
      # default subnet reports none, so recording it does not change the next apply's inputs
      subnet_id = try(var.subnet_ids != null || var.replicas[id].subnet_id != null ? inst.subnet_id : null, null)
      market    = try(var.replicas[id].market, null)
    }
  }
}

output "security_group_id" {
  description = "The security group opening the model server port."
  value       = try(aws_security_group.replicas[local.vpc_id].id, null)
}
